"""How fast does the trained world train, eager against ``--compile``? (GPU, about 6 minutes with --profile)

    bash benchmarks/run_on_device.sh python -m benchmarks.training_speed --steps 80 --skip 30 --profile --json $OUT/training_speed.json

Trains each recipe for ``--steps`` steps from a fresh world on a small clip pool (the speed does
not depend on the pool's size) and reports the median step time after the first
``--skip`` steps (lazy initialisation, autotuning, compilation), plus the seconds those first
steps took. With ``--profile`` it also prints the eager run's heaviest operators (torch.profiler)
over a few steps: where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from li_compile.worlds.trained import IMAGE_SIZE, TRAINED_SPEC
from training.recipe import TrainConfig, train
from training.data import make_pool

RECIPES = {  # name -> (TrainConfig changes, WorldSpec changes) from the defaults (the shipped recipe)
    "qk_gain_1_no_prope": ({"qk_gain": 1.0}, {"prope_unit": None}),  # the previous weights' recipe
    "qk_gain_2_prope_4": ({}, {}),
}


def time_steps(config: TrainConfig, spec, pool, device: str, skip: int) -> dict[str, float]:
    """Train ``config.steps`` steps; the median seconds per step after ``skip`` and the first steps' total."""
    stamps = []

    def on_step(state) -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    state = train(config, device, on_step=on_step, pool=pool, spec=spec)
    step_s = statistics.median(b - a for a, b in zip(stamps[skip:], stamps[skip + 1:]))
    return {"first_steps_s": round(stamps[skip] - start, 2), "step_ms": round(1000 * step_s, 2),
            "steps_per_s": round(1 / step_s, 2), "final_loss": state.losses[-1]}


def profile(config: TrainConfig, spec, pool, device: str, rows: int) -> str:
    """The heaviest operators of a few eager steps, by device time, as torch.profiler's table."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        train(config, device, pool=pool, spec=spec)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=30)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    base = TrainConfig(clips=args.clips, steps=args.steps)
    pool = make_pool(base.clips, base.clip_frames, TRAINED_SPEC, base.seed, args.device, IMAGE_SIZE)
    results = []
    for name in args.recipes:
        changes, spec_changes = RECIPES[name]
        spec = replace(TRAINED_SPEC, **spec_changes)
        for compiled in (False, True):
            config = replace(base, compile=compiled, **changes)
            row = {"recipe": name, "compile": compiled, **time_steps(config, spec, pool, args.device, args.skip)}
            print(json.dumps(row), flush=True)
            results.append(row)
        if args.profile:
            print(profile(replace(base, steps=8, **changes), spec, pool, args.device, 30), flush=True)
    if args.json:
        device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "steps": args.steps,
                                         "skip": args.skip, "results": results}, indent=2))


if __name__ == "__main__":
    main()
