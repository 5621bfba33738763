"""Every launch configuration of the block-sparse kernel, timed alone on two world-model shapes (GPU).

The autotuner keeps the fastest of ``CUDA_CONFIGS`` per shape; this script shows the whole field, so
that the list can be chosen from measurements: each (BLOCK_M, BLOCK_N, warps, stages) with pointer
loads and with TMA descriptor loads (a row whose ``kernel`` says "plain (TMA failed ...)" could not
build the TMA variant and ran the plain one). Cases (bf16, 24 heads x 128,
one 3840-query chunk over 15360 keys, blocks of 128): ``random`` at density 1 and 0.25 (Triton
alone) and ``structured`` at density 0.5 (the chunk's keys through flash, the rest through Triton
seeded by flash's output). TFLOP/s count visited blocks; a config Triton cannot build is a row with
its error. Writes ``kernel_configs.json`` into ``--out``.

    bash benchmarks/run_on_device.sh python benchmarks/kernel_configs.py --out "$OUT" --budget-s 240
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import li_compile.kernels.block_sparse_attention as bsa
from benchmarks.attention import BLOCK, HEAD_DIM, make_layout, time_ms
from li_compile.kernels.split_attention import split_attention, split_layout

CONFIGS = [
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 4, 2),
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 64, 8, 4), (128, 64, 4, 2),
    (64, 128, 4, 3), (64, 64, 4, 3),
]
VARIANTS = [("plain", "0"), ("tma", "1")]
CASES = [("random", 1.0), ("structured", 0.5), ("random", 0.25)]


def prepare(kind: str, density: float, heads=24, q_len=3840, kv_len=15360) -> dict:
    """One case's inputs, its split layout, its masked-SDPA reference and dense SDPA's time."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for n in (q_len, kv_len, kv_len))
    layout, span = make_layout(kind, heads, q_len, kv_len, density, gen, 880)
    layout = layout.to("cuda")
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.to_dense_mask()).float()
        sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    visited = layout.block_mask().expand(1, heads, -1, -1).sum().item() * BLOCK * BLOCK
    return dict(qkv=(q, k, v), rest=split_layout(layout, span), span=span, reference=reference, sdpa_ms=sdpa_ms,
                visited=visited)


def run(case: dict, config, variant) -> dict:
    """Time one config on one case; the kernel is rebuilt with that config as its only candidate."""
    name, tma = variant
    os.environ["LI_KERNEL_TMA"] = tma
    bsa.CUDA_CONFIGS, bsa.SMALL_BLOCK_CONFIGS, bsa._KERNELS = [config], [], None
    q, k, v = case["qkv"]
    row = {"config": list(config), "variant": name, "sdpa_ms": case["sdpa_ms"]}
    try:
        with torch.no_grad():
            ours = split_attention(q, k, v, case["rest"], case["span"])
            row["err_vs_masked_sdpa"] = ((ours.float() - case["reference"]).norm() / case["reference"].norm()).item()
            row["ms"] = time_ms(lambda: split_attention(q, k, v, case["rest"], case["span"]))
        row["tflops_visited"] = 4 * case["visited"] * HEAD_DIM / row["ms"] / 1e9
        row["speedup_vs_sdpa"] = case["sdpa_ms"] / row["ms"]
        row["kernel"] = bsa.kernel_variant()
    except Exception as failure:  # noqa: BLE001 - a config Triton cannot build is a result row
        row["error"] = f"{type(failure).__name__}: {str(failure)[:300]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    for kind, density in CASES:
        case = prepare(kind, density)
        for variant in VARIANTS:
            for config in CONFIGS:
                if time.perf_counter() - start > args.budget_s:
                    break
                row = {"kind": kind, "density": density, **run(case, config, variant)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                (args.out / "kernel_configs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
