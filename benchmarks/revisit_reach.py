"""How many chunks of a trajectory any denoising cache could serve at a revisit threshold (CPU).

A chunk can be served only when every one of its frames matches some earlier frame of the
trajectory at ``cache.revisit_threshold`` (``frame_revisit_scores``, the cache's own measure). Per
trajectory this prints those chunks (the most hits any cache at that threshold can make, since it
can only hold earlier frames) and the near misses: chunks whose worst frame scores within ``--near``
below the threshold, with every frame's best score, and which of them only continue the path
(``continues_path``: every frame matches the last camera of the chunk just before at least as well). Compare with a run's ``cache_hits``.
``--skip-previous`` leaves the chunk just before out of the past frames (how many matches only
continue the path rather than return to it)::

    python benchmarks/revisit_reach.py [--chunks 32] [--chunk-frames 4] [--threshold 0.9] [--near 0.1] \\
        [--trajectories random_walk_with_returns,out_and_back,loop,wander] [--skip-previous] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from li_compile.denoise_cache import continues_path, frame_revisit_scores
from li_compile.options import CacheOptions
from li_compile.worlds import trajectories


def best_past_matches(poses: torch.Tensor, chunk_frames: int, skip: int = 0) -> list[tuple[list[float], list[int]]]:
    """Per chunk after the first, each frame's best match among the frames of the chunks before it,
    less the ``skip`` chunks just before: ``poses (N * chunk_frames, 4, 4)`` -> ``N - 1`` pairs of
    ``chunk_frames`` scores (0 where no chunk is left) and the past frame each matched (-1: none)."""
    chunks = poses.shape[0] // chunk_frames
    rows = []
    for c in range(1, chunks):
        current, past = poses[c * chunk_frames:(c + 1) * chunk_frames], poses[:max(c - skip, 0) * chunk_frames]
        if past.shape[0] == 0:
            rows.append(([0.0] * chunk_frames, [-1] * chunk_frames))
            continue
        best = frame_revisit_scores(current, past).max(-1)
        rows.append((best.values.tolist(), best.indices.tolist()))
    return rows


def reach(name: str, chunks: int, chunk_frames: int, threshold: float, near: float, skip: int = 0) -> dict:
    """The servable chunks and the near misses of trajectory ``name`` (seed 0, as end_to_end.py),
    matched against the chunks before each but the ``skip`` last."""
    poses = trajectories.make(name, chunks * chunk_frames, seed=0, chunk_frames=chunk_frames).poses
    matches = best_past_matches(poses, chunk_frames, skip)
    servable = [c for c, (row, _) in enumerate(matches, 1) if min(row) >= threshold]
    near_misses = {c: [round(s, 2) for s in row] for c, (row, _) in enumerate(matches, 1)
                   if threshold - near <= min(row) < threshold}
    continuations = [c for c, (row, _) in enumerate(matches, 1) if c in near_misses and continues_path(
        poses[c * chunk_frames:(c + 1) * chunk_frames], torch.tensor(row), poses[c * chunk_frames - 1])]
    return {"trajectory": name, "chunks": chunks, "servable": servable, "near_misses": near_misses,
            "continuations": continuations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-frames", type=int, default=4, help="latent frames per chunk (HY full: 4)")
    parser.add_argument("--threshold", type=float, default=CacheOptions().revisit_threshold)
    parser.add_argument("--near", type=float, default=0.1, help="how far below the threshold a near miss is")
    parser.add_argument("--trajectories", default="random_walk_with_returns,out_and_back,loop,wander")
    parser.add_argument("--skip-previous", action="store_true", help="leave the chunk just before out of the past")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [reach(name, args.chunks, args.chunk_frames, args.threshold, args.near, int(args.skip_previous))
            for name in args.trajectories.split(",")]
    for row in rows:
        print(f"{row['trajectory']}: {len(row['servable'])} of {row['chunks']} chunks servable at "
              f"{args.threshold} {row['servable']}; {len(row['near_misses'])} near misses, "
              f"{len(row['continuations'])} of them continuations {row['continuations']}")
        for chunk, scores in row["near_misses"].items():
            print(f"  chunk {chunk}: best score per frame {scores}")
    if args.json:
        args.json.write_text(json.dumps({"threshold": args.threshold, "near": args.near, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
