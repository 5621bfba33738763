"""Where a light_interaction warm-up goes at depth: Dynamo's trace of the whole model against the
backend's passes, with no inner compilation (``inner="eager"``), for one model call.

    python benchmarks/warmup_cost.py [--world hy_worldplay] [--preset tiny] [--depth 54]

Each capacity bucket is one such trace (two on CUDA: a padded and a full context), so this times
what regional compilation (``li_compile.regions``, which cuts only what Inductor compiles) leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import li_compile.backend
from li_compile.worlds import hy_worldplay, matrix_game3
from li_compile.worlds.pipeline import warm_up

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="hy_worldplay")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--depth", type=int, default=54)
    args = parser.parse_args()
    module = WORLDS[args.world]
    world = module.build(dataclasses.replace(module.PRESETS[args.preset], depth=args.depth))
    passes_s = [0.0]
    run_passes = li_compile.backend.run_passes

    def timed_passes(gm, ctx):
        start = time.perf_counter()
        try:
            return run_passes(gm, ctx)
        finally:
            passes_s[0] += time.perf_counter() - start

    li_compile.backend.run_passes = timed_passes  # this process only: the script's own measurement
    world = world.compile(lambda m: torch.compile(m, backend="light_interaction", options={"inner": "eager"},
                                                  dynamic=False))
    start = time.perf_counter()
    warm_up(world, (world.spec.context_frames,))
    total = time.perf_counter() - start
    print(f"{world.spec.name} depth {args.depth}: first call {total:.1f} s, of which the backend's passes "
          f"{passes_s[0]:.1f} s; the rest is Dynamo's trace (and the eager call itself)")


if __name__ == "__main__":
    main()
