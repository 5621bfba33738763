"""Where the trained world's distance to the truth comes from: sampler or model? (CPU, a few minutes)

    python benchmarks/trained_diagnostics.py --json out/trained_diagnostics.json

Two probes on held-out rooms, scored by PSNR against the renderer's ground truth:

- **steps**: dense rollouts with 1, 2 and 4 Euler steps, and with 4 steps at timestep shifts 1, 3,
  7 (the preset's) and 15. One step from pure noise returns the model's mean prediction (the
  PSNR-optimal guess); if more steps score far better, the sampler is at fault, if they score alike
  (or worse), the model is.
- **context** (the first generated chunk, one step): with the true context, with only the last
  given frame, and with the first chunk of a *different* room. The gap between the true and the
  wrong room says how much the model reads its context; "repeat last" is what copying the last
  given frame would score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from li_compile.worlds.fidelity import add_case_arguments, rollout, trained_world_and_cases
from li_compile.worlds.report_tools import frame_psnr, repeat_last
from li_compile.worlds.pipeline import DensePolicy

STEPS = (1, 2, 4)
SHIFTS = (1.0, 3.0, 7.0, 15.0)  # timestep shifts of the 4-step sampler (the preset's: 7)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def dense_score(world, codec, cases, **sampler) -> float:
    """Mean PSNR of whole dense rollouts (frames after the given chunk) with the sampler settings
    ``sampler`` (``steps``, ``shift``) in place of the preset's."""
    f, preset = world.spec.chunk_frames, world.spec
    world.spec = dataclasses.replace(preset, **sampler)
    try:
        return mean([frame_psnr(rollout(world, codec, c, DensePolicy(preset.window, preset.memory))[f:], c.frames[f:])
                     for c in cases])
    finally:
        world.spec = preset


def steps_probe(world, codec, cases) -> dict[str, float]:
    """Dense rollout PSNR with each number of steps, and with each timestep shift at the preset's steps."""
    f = world.spec.chunk_frames
    result = {f"dense_{steps}_steps": dense_score(world, codec, cases, steps=steps) for steps in STEPS}
    result |= {f"dense_shift_{shift:g}": dense_score(world, codec, cases, shift=shift) for shift in SHIFTS}
    result["repeat_last"] = mean([frame_psnr(repeat_last(c.frames, f), c.frames[f:]) for c in cases])
    return result


def context_probe(world, codec, cases) -> dict[str, float]:
    """PSNR of the first generated chunk (one step: the mean prediction) under three contexts."""
    f = world.spec.chunk_frames
    world.spec = dataclasses.replace(world.spec, steps=1)
    chunk = slice(f, 2 * f)
    two_chunks = [dataclasses.replace(c, frames=c.frames[:2 * f]) for c in cases]

    def score(policy, swap: bool) -> float:
        values = []
        for i, case in enumerate(two_chunks):
            given = two_chunks[(i + 1) % len(two_chunks)] if swap else case
            probe = dataclasses.replace(case, frames=torch.cat([given.frames[:f], case.frames[f:]]))
            values.append(frame_psnr(rollout(world, codec, probe, policy)[chunk], case.frames[chunk]))
        return mean(values)

    spec = world.spec
    return {
        "true_context": score(DensePolicy(spec.window, spec.memory), swap=False),
        "last_frame_only": score(DensePolicy(1, 0), swap=False),
        "other_room_context": score(DensePolicy(spec.window, spec.memory), swap=True),
        "repeat_last": mean([frame_psnr(repeat_last(c.frames, f, 2 * f), c.frames[chunk]) for c in two_chunks]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, per_trajectory=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    world, codec, cases = trained_world_and_cases(args)
    result = {"cases": [f"{c.trajectory.name}/{c.scene_seed}" for c in cases], "frames": args.frames}
    with torch.no_grad():
        result["steps"] = steps_probe(world, codec, cases)
        print("steps:", {k: round(v, 2) for k, v in result["steps"].items()}, flush=True)
        result["context"] = context_probe(world, codec, cases)
        print("context (first generated chunk, 1 step):", {k: round(v, 2) for k, v in result["context"].items()})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
