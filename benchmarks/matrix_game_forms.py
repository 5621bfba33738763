"""Matrix-Game full in its two forms, by FLOPs (no GPU): upstream's (``form="full"``: the 5 memory and
4 re-injected frames re-run with the chunk at every step) against the KV-cache form (the context
once per chunk), and what light_interaction's chunks cost in upstream's form: a miss with the
context rows reused at the middle step (``context.reuse_rows``; ``context.row_blocks``: the row-wise
layers on the chunk's rows too), a cache hit (every step but the last served). Projected over the
hits of measured runs of the KV-cache form (the cache matches cameras, so the form does not change
them); every other chunk counts as a full-context miss::

    python benchmarks/matrix_game_forms.py benchmarks/results/e2e_runs/matrix_game3_full_d30_*_blocks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.context_reuse_projection import Dims, block_flops, miss_cost
from li_compile.worlds import matrix_game3

SPEC = matrix_game3.PRESETS["full"]
MG_FULL = Dims.of(SPEC)


def dense_chunk_flops(form: str, dims: Dims = MG_FULL, context_frames: int = SPEC.context_frames) -> float:
    """One block's FLOPs over a dense chunk: ``"full"``, every step on context and chunk;
    ``"cached"``, the context pass then every step's chunk queries over context and chunk keys."""
    context, chunk = context_frames * dims.tokens, dims.chunk * dims.tokens
    if form == "full":
        return dims.steps * block_flops(dims, context + chunk, context + chunk)
    return block_flops(dims, context, context) + dims.steps * block_flops(dims, chunk, context + chunk)


def projected(hits: int, chunks: int, sliced: bool) -> float:
    """light_interaction's speedup in upstream's form over ``chunks`` chunks with ``hits`` hits."""
    miss, hit = miss_cost(SPEC.context_frames, sliced, MG_FULL), 1 / MG_FULL.steps
    return chunks / ((chunks - hits) * miss + hits * hit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="end_to_end.py per-trajectory JSON files of Matrix-Game full")
    args = parser.parse_args()
    ratio = dense_chunk_flops("full") / dense_chunk_flops("cached")
    print(f"dense chunk, upstream's form over the KV-cache form: {ratio:.2f}")
    print(f"upstream's form: a miss {miss_cost(SPEC.context_frames, False, MG_FULL):.3f} of dense "
          f"({miss_cost(SPEC.context_frames, True, MG_FULL):.3f} with context.row_blocks), a hit {1 / MG_FULL.steps:.3f}")
    print("| trajectory | hits / chunks | measured, KV-cache form | projected, upstream's form | with context.row_blocks |")
    print("| --- | --- | --- | --- | --- |")
    for path in args.runs:
        record = json.loads(path.read_text())
        (run, result), = record["runs"].items()
        chunks = result["per_chunk"]
        hits = sum(1 for c in chunks if c["cache_hits"])
        print(f"| {record['trajectory']} | {hits} / {len(chunks)} | {result['speedup']:.2f}x ({run}) | "
              f"{projected(hits, len(chunks), False):.2f}x | {projected(hits, len(chunks), True):.2f}x |")


if __name__ == "__main__":
    main()
