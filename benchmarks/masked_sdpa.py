"""What a key-padding mask costs SDPA at the full presets' attention shapes (GPU).

A full context needs no mask, and SDPA runs flash (or cuDNN) only without one; with a mask, even an
all-True one, it picks a kernel that reads a bias. Whether a model should compile a second, unmasked
graph for its full context (one more graph to trace and compile at warm-up, for light_interaction
and dense alike) turns on this difference. For each world's full preset this times one attention call
(bf16, median of CUDA-graph replays) over the full context with no mask, and with its bool key-padding mask
(broadcast over heads and queries) all True and a quarter padded, under SDPA's default choice and
each backend that accepts the call; it prints a table and writes ``--out``/masked_sdpa.json.

    bash benchmarks/run_on_device.sh python benchmarks/masked_sdpa.py --out DIR
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from li_compile.worlds import hy_worldplay, matrix_game3

BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def shapes() -> list[dict]:
    """Each full preset's largest attention call: (heads, queries, keys, head dim)."""
    hy, mg = hy_worldplay.PRESETS["full"], matrix_game3.PRESETS["full"]
    hy_len = (hy.window + hy.memory + hy.chunk_frames) * hy.tokens_per_frame  # every token a query
    mg_keys = (mg.context_frames + mg.chunk_frames) * mg.tokens_per_frame  # chunk queries over cache + chunk
    return [
        {"world": hy.name, "heads": hy.heads, "q": hy_len, "k": hy_len, "d": hy.head_dim},
        {"world": mg.name, "heads": mg.heads, "q": mg.chunk_frames * mg.tokens_per_frame, "k": mg_keys,
         "d": mg.head_dim},
    ]


def measure(shape: dict) -> list[dict]:
    """Rows of (mask, backend, ms, ratio to the unmasked default) for one shape."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, shape["heads"], shape["q"], shape["d"], device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, shape["heads"], shape["k"], shape["d"], device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    padded = torch.ones(1, 1, 1, shape["k"], dtype=torch.bool, device="cuda")
    padded[..., : shape["k"] // 4] = False
    masks = {"none": None, "all_true": torch.ones_like(padded), "quarter_padded": padded}
    rows = []
    for mask_name, mask in masks.items():
        for backend_name, backend in BACKENDS.items():
            def call():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            try:  # the median of CUDA-graph replays, as benchmarks/attention.py times
                with nullcontext() if backend is None else sdpa_kernel([backend]):
                    ms = triton.testing.do_bench_cudagraph(call, rep=60, return_mode="median")
            except RuntimeError as refused:  # this backend does not take the call
                rows.append({**shape, "mask": mask_name, "backend": backend_name, "ms": None,
                             "refused": str(refused).splitlines()[0][:120]})
                continue
            rows.append({**shape, "mask": mask_name, "backend": backend_name, "ms": ms})
    base = next(r["ms"] for r in rows if r["mask"] == "none" and r["backend"] == "default")
    for r in rows:
        r["vs_unmasked_default"] = None if r["ms"] is None else r["ms"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [r for shape in shapes() for r in measure(shape)]
    print("| world | heads x q x k | mask | backend | ms | vs unmasked default |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ms = "refused" if r["ms"] is None else f"{r['ms']:.3f}"
        ratio = "" if r["vs_unmasked_default"] is None else f"{r['vs_unmasked_default']:.2f}x"
        print(f"| {r['world']} | {r['heads']} x {r['q']} x {r['k']} | {r['mask']} | {r['backend']} | {ms} | {ratio} |")
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "masked_sdpa.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
