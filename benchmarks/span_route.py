"""The dense span through flash (seeded) or inside the Triton kernel: both routes timed on every
structured case, each with its own autotuning (GPU).

``li::split_attention`` runs a plan's dense span (the chunk and the recent frames) through SDPA's
fused kernel and seeds the Triton kernel with its partial output, unless the span's work is under
``MIN_FLASH_SPAN_WORK``, where the kernel visits the span itself. This script measures that choice:
for each structured layout of ``benchmarks/attention.py`` (bf16, 24 heads x 128, blocks of 128) it
times both routes, each after tuning the kernel for that route alone (the package shares one tuning
between them), and records the config each tuning chose, the path the package takes, and the error
of both against masked SDPA. Writes ``span_route.json`` and ``span_route.md`` into ``--out``.

    bash benchmarks/run_on_device.sh python benchmarks/span_route.py --out "$OUT" --budget-s 150
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import li_compile.kernels.block_sparse_attention as bsa
from benchmarks.attention import BLOCK, HEAD_DIM, rel_err, structured_layout, time_ms, tune_afresh
from li_compile.kernels.split_attention import MIN_FLASH_SPAN_WORK, flash_partial, split_layout, split_path

HEADS = 24
CASES = [(q_len, q_len * ratio, density) for q_len in (8800, 3840) for ratio in (1, 2, 4, 8)
         for density in (0.125, 0.25, 0.5)]


def rest_blocks(rest) -> float:
    """Mean key blocks per (head, query block) that the Triton kernel visits besides the span."""
    counts = rest.kv_num_blocks if rest.full_kv_num_blocks is None else rest.kv_num_blocks + rest.full_kv_num_blocks
    return counts.float().mean().item()


def run_case(q_len: int, kv_len: int, density: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for n in (q_len, kv_len, kv_len))
    layout, span = structured_layout(HEADS, q_len, kv_len, density, gen)
    layout = layout.to("cuda")
    rest = split_layout(layout, span)
    lists = (rest.kv_num_blocks, rest.kv_indices, rest.full_kv_num_blocks, rest.full_kv_indices, rest.key_keep)
    scale = HEAD_DIM ** -0.5
    span_keys = (span[1] - span[0]) * BLOCK
    row = {"heads": HEADS, "q_len": q_len, "kv_len": kv_len, "density": density, "span_keys": span_keys,
           "rest_blocks_per_query_block": rest_blocks(rest),
           "span_work": HEADS * q_len * HEAD_DIM * span_keys, "package_threshold": MIN_FLASH_SPAN_WORK}

    def seeded():
        seed, _ = flash_partial(q, k, v, span, BLOCK, scale)
        return bsa.launch_split(q, k, v, *lists, None, BLOCK, BLOCK, scale, False, span=span, seed=seed)

    def in_kernel():
        return bsa.launch_split(q, k, v, *lists, None, BLOCK, BLOCK, scale, False, span=span)

    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.to_dense_mask()).float()
        row["sdpa_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        for name, fn in (("seeded", seeded), ("in_kernel", in_kernel)):
            tune_afresh()
            row[f"{name}_err"] = rel_err(fn(), reference)
            row[f"{name}_config"] = list(bsa.tuned_configs().values())
            row[f"{name}_ms"] = time_ms(fn)
        row["package_path"] = split_path(q, k, v, rest, span)
    row["seeded_over_in_kernel"] = row["seeded_ms"] / row["in_kernel_ms"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| Lq | Lk | density | span keys | rest blocks | span work | SDPA ms | seeded ms | in-kernel ms | "
             "seeded / in-kernel | package path | configs (seeded; in-kernel) |", "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['q_len']} | {r['kv_len']} | {r['density']} | {r['span_keys']} | {r['rest_blocks_per_query_block']:.1f} "
            f"| {r['span_work']:.1e} | {r['sdpa_ms']:.3f} | {r['seeded_ms']:.3f} | {r['in_kernel_ms']:.3f} "
            f"| {r['seeded_over_in_kernel']:.3f} | {r['package_path'].split(' (')[0]} "
            f"| {'; '.join(', '.join(r[f'{n}_config']) for n in ('seeded', 'in_kernel'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no new case after this many seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    for q_len, kv_len, density in CASES:
        if time.perf_counter() - start > args.budget_s:
            break
        rows.append(run_case(q_len, kv_len, density))
        print(json.dumps(rows[-1]), flush=True)
        device = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variant": bsa.kernel_variant()}
        (args.out / "span_route.json").write_text(json.dumps({**device, "rows": rows}, indent=1))
    (args.out / "span_route.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
