"""What ``context.reuse_rows`` saves on HY full, by FLOPs, from chunk times measured with it off (no GPU).

Per DiT block at ``N`` tokens, width ``D``, ``T`` text tokens, MLP ratio ``r`` (``Dims``, from a
preset): self-attention ``4 N^2 D``, the linear layers (QKV, projection, MLP) ``(8 + 4 r) N D^2``,
and cross-attention ``4 N T D + 4 N D^2``. A step that reuses the context rows computes the chunk's
query rows against every key (that share of self-attention) and every row-wise layer on every row;
with ``--sliced`` the row-wise layers run on the chunk's rows only (not built). A full-context
miss is 2 full steps and ``steps - 2`` reused ones. Each miss chunk (no cache hit, a context) of a
light_interaction run measured with reuse off (``--run``; ``all_no_reuse_rows`` in runs made since
reuse became the default) but the first (the probe, which computes every row) is scaled by that
ratio; hits and context-free chunks are kept::

    python benchmarks/context_reuse_projection.py benchmarks/results/e2e_runs/hy_worldplay_full_d54_*_blocks.json

It also prints the kept outputs' memory at HY full's depth (bf16).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from li_compile.worlds import hy_worldplay
from li_compile.worlds.base import WorldSpec


@dataclass(frozen=True)
class Dims:
    """What a DiT step's FLOPs depend on: tokens per frame, width, text tokens, chunk frames, steps,
    MLP ratio, heads x head dim, depth."""

    tokens: int
    width: int
    text: int
    chunk: int
    steps: int
    mlp_ratio: float
    heads: int
    head_dim: int
    depth: int

    @classmethod
    def of(cls, spec: WorldSpec) -> "Dims":
        return cls(spec.tokens_per_frame, spec.dim, spec.text_tokens, spec.chunk_frames, spec.steps, spec.mlp_ratio,
                   spec.heads, spec.head_dim, spec.depth)


HY_FULL = Dims.of(hy_worldplay.PRESETS["full"])


def block_flops(dims: Dims, queries: int, keys: int, rows: int | None = None) -> float:
    """FLOPs of one block: ``queries`` query tokens against ``keys`` keys, the row-wise layers on
    ``rows`` tokens (default ``queries``); its keys' own projections are counted only through ``rows``."""
    rows = queries if rows is None else rows
    d = dims.width
    attention = 4 * queries * keys * d
    row_wise = (8 + 4 * dims.mlp_ratio) * rows * d**2 + 4 * rows * dims.text * d + 4 * rows * d**2
    return attention + row_wise


def reused_step_cost(context_frames: int, sliced: bool = False, dims: Dims = HY_FULL) -> float:
    """A reused step's FLOPs over a full step's, at ``context_frames`` context frames."""
    n = (context_frames + dims.chunk) * dims.tokens
    chunk = dims.chunk * dims.tokens  # the chunk's rows
    return block_flops(dims, chunk, n, chunk if sliced else n) / block_flops(dims, n, n)


def miss_cost(context_frames: int, sliced: bool = False, dims: Dims = HY_FULL) -> float:
    """A full-context miss's time with the option over without it (first and last step full)."""
    return (2 + (dims.steps - 2) * reused_step_cost(context_frames, sliced, dims)) / dims.steps


def projected_speedup(record: dict, run: str, sliced: bool = False) -> tuple[str, float, float]:
    """(run, measured speedup, projected speedup) of run ``run`` of one ``end_to_end.py``
    per-trajectory record."""
    result = record["runs"][run]
    projected, probed = 0.0, False
    for chunk in result["per_chunk"]:
        seconds = chunk["light_ms"] / 1000
        context = chunk["window"] + chunk["memory_kept"]
        miss = chunk["cache_hits"] == 0 and chunk["chunk"] > 0 and context > 0
        projected += seconds * (miss_cost(context, sliced) if miss and probed else 1.0)
        probed = probed or miss  # the first such chunk is the probe: every row computed
    return run, result["speedup"], result["time_dense_s"] / projected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="end_to_end.py per-trajectory JSON files of HY full")
    parser.add_argument("--run", default="all@blocks", help="the run measured with context.reuse_rows off")
    args = parser.parse_args()
    print(f"reused step at 20 context frames: {reused_step_cost(20):.2f} of a full step "
          f"(row-wise layers on the chunk's rows only: {reused_step_cost(20, True):.2f}); "
          f"full-context miss {miss_cost(20):.2f} ({miss_cost(20, True):.2f})")
    kept_gb = HY_FULL.depth * HY_FULL.heads * 20 * HY_FULL.tokens * HY_FULL.head_dim * 2 / 1e9
    print(f"kept context-row outputs at depth {HY_FULL.depth}, 20 context frames, bf16: {kept_gb:.1f} GB")
    print("| trajectory | run | measured | projected | projected, row-wise layers on the chunk's rows |")
    print("| --- | --- | --- | --- | --- |")
    for path in args.runs:
        record = json.loads(path.read_text())
        run, measured, projected = projected_speedup(record, args.run)
        sliced = projected_speedup(record, args.run, sliced=True)[2]
        print(f"| {record['trajectory']} | {run} | {measured:.2f}x | {projected:.2f}x | {sliced:.2f}x |")


if __name__ == "__main__":
    main()
