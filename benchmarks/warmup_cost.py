"""Where a light_interaction warm-up goes at depth: Dynamo's trace of the whole model against the
backend's passes, with no inner compilation (``inner="eager"``), for one model call.

    python benchmarks/warmup_cost.py [--world hy_worldplay] [--preset tiny] [--depth 54] [--harness] \
        [--inner eager|inductor] [--nested-blocks]

Each capacity bucket is one such trace (on CUDA one more, a full context without its mask, at the
largest bucket), so this times what regional compilation (``li_compile.regions``, which cuts only
what Inductor compiles) leaves. ``--harness`` then times the benchmarks' whole light_interaction
warm-up (``report_tools.light_interaction_setup``) as it runs on CUDA, and counts its graphs.
``--nested-blocks`` has Dynamo trace one block for all (``li_compile.nest_repeated_blocks``);
``--inner inductor`` adds Inductor's share (one block per shape, ``li_compile.regions``);
``--dynamic none`` compiles the harness as torch.compile's default does (``li_compile.specialize``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from torch._dynamo.utils import counters

import li_compile.backend
from li_compile.repeated_blocks import nest_repeated_blocks
from li_compile.specialize import SPECIALIZE_COUNTER
from li_compile.worlds import hy_worldplay, matrix_game3, report_tools
from li_compile.worlds.pipeline import warm_up

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="hy_worldplay")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--depth", type=int, default=54)
    parser.add_argument("--harness", action="store_true", help="also time the whole warm-up of a light_interaction run")
    parser.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    parser.add_argument("--nested-blocks", action="store_true", help="trace one block for all (nest_repeated_blocks)")
    parser.add_argument("--dynamic", choices=("false", "none"), default="false",
                        help="--harness: torch.compile's dynamic= (none: one symbolic graph for the buckets above the first)")
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
    if args.nested_blocks:
        nest_repeated_blocks(world.model)
    world = world.compile(lambda m: torch.compile(m, backend="light_interaction", options={"inner": args.inner},
                                                  dynamic=False))
    start = time.perf_counter()
    warm_up(world, (world.spec.context_frames,))
    total = time.perf_counter() - start
    print(f"{world.spec.name} depth {args.depth}: first call {total:.1f} s, of which the backend's passes "
          f"{passes_s[0]:.1f} s; the rest is Dynamo's trace, the inner compiler ({args.inner}) and the call itself")
    if args.harness:
        report_tools.full_context_masked = lambda world: False  # this process only: warm up as on CUDA
        harness_world = module.build(world.spec)
        if args.nested_blocks:
            nest_repeated_blocks(harness_world.model)
        setup = report_tools.light_interaction_setup(harness_world, {"inner": args.inner},
                                                     dynamic={"false": False, "none": None}[args.dynamic])
        torch._dynamo.reset()
        frames, start = counters["frames"]["ok"], time.perf_counter()
        setup.warm_up()
        print(f"light_interaction warm-up as on CUDA (inner {args.inner}, dynamic={args.dynamic}): "
              f"{counters['frames']['ok'] - frames} Dynamo graphs, {counters[SPECIALIZE_COUNTER]['compiled']} "
              f"specialized, in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
