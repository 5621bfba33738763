"""Which temporal-window rule and keep threshold keep fidelity on the reference trajectories? (CPU)

Three measurements:

1. **Dynamics of real content.** Held-out rooms are rendered along every reference trajectory
   (``training.fidelity.held_out_cases``) and encoded to latents by the trained world's
   pixel-patch codec; the controller's dynamics measure (``latent_dynamics`` over the last
   ``window_max`` frames) is taken at every chunk, and the window each rule would pick is
   reported. This shows whether ``window.DYNAMICS_LOW/HIGH`` spread real motion over the window
   range.
2. **Fidelity against dense generation.** Each tiny reference world (random weights, the preset's
   window widened to ``--window`` frames so the rules have room) generates every trajectory with
   ``DensePolicy`` and with the controller: every window rule (no pruning: keep threshold 0) and a
   sweep of keep thresholds (fixed window). Scores: PSNR in dB of the decoded frames against dense
   generation (chunks after the first), and the context fed per chunk relative to dense (the
   compute a compact context saves). Random weights make these worlds lean little on their
   context, so differences are small in absolute terms; the ranking is what they show.
3. **Context coverage on real content** (model-free). Along the rendered held-out cases, with the
   true frames as the history, each policy picks the context of every chunk; coverage is the mean
   over the chunk's true frames of the best PSNR of any context frame against it: does the context
   still hold what the chunk will show? Reported with the context fed relative to ``DensePolicy``.

    python -m benchmarks.window_rules [--chunks 10] [--json out/window_rules.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from li_compile.controller.context import ContextController
from li_compile.options import Options
from li_compile.plan import Plan
from li_compile.controller.window import latent_dynamics, window_size
from li_compile.options import WINDOW_RULES
from li_compile.worlds import hy_worldplay, matrix_game3
from training.fidelity import held_out_cases
from li_compile.worlds.report_tools import psnr
from li_compile.worlds.pipeline import DensePolicy, generate
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.trajectories import TRAJECTORIES, make
from li_compile.worlds.trained import IMAGE_SIZE, PIXEL_STRIDE

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}
THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
DENSE_MEASURE = "frustum"  # DensePolicy's retrieval measure: with threshold 0 the memory is the same


def render_dynamics(frames: int, chunk_frames: int, window_max: int) -> dict:
    """Per trajectory: quantiles of the dynamics the controller measures on rendered content, and the
    mean window each rule picks from them (range ``[1, window_max]``)."""
    codec = PixelPatchCodec(PIXEL_STRIDE)
    rows = {}
    for case in held_out_cases(frames, 1, IMAGE_SIZE):
        latents = codec.encode(case.frames)
        starts = range(2 * chunk_frames, frames + 1, chunk_frames)
        dynamics = torch.stack([latent_dynamics(latents[max(0, s - window_max):s]) for s in starts])
        row = {f"dynamics_q{int(q * 100)}": round(dynamics.quantile(q).item(), 3) for q in (0.1, 0.5, 0.9)}
        for rule in WINDOW_RULES:
            row[f"window_{rule}"] = round(window_size(dynamics, rule, 1, window_max).float().mean().item(), 2)
        rows[case.trajectory.name] = row
    return rows


def coverage(case, codec: PixelPatchCodec, policy, chunk_frames: int) -> tuple[float, int]:
    """Mean coverage PSNR over the chunks after the first, and the context frames fed. A chunk frame's
    coverage: PSNR of the per-pixel best match among the context frames (the pixel's smallest squared
    error over them), so complementary views count, not only the latest frame."""
    latents = codec.encode(case.frames)
    poses = case.trajectory.poses
    scores, fed = [], 0
    for chunk in range(1, len(case.frames) // chunk_frames):
        first = chunk * chunk_frames
        selection = policy.select(chunk, poses[:first], poses[first:first + chunk_frames], latents[:first])
        context = case.frames[selection.frames]  # (K, 3, H, W)
        fed += len(selection.frames)
        for frame in case.frames[first:first + chunk_frames]:
            best = (context - frame).pow(2).mean(1).amin(0)  # (H, W)
            scores.append(10 * torch.log10(1 / best.mean().clamp_min(1e-10)))
    return torch.stack(scores).mean().item(), fed


def render_coverage(frames: int, chunk_frames: int, window: int, memory: int) -> dict:
    """Coverage (see the module docstring) of every rule and threshold, per trajectory."""
    codec = PixelPatchCodec(PIXEL_STRIDE)
    spec = dataclasses.replace(hy_worldplay.PRESETS["tiny"], memory=memory, window=window)
    rows = {}
    for case in held_out_cases(frames, 1, IMAGE_SIZE):
        dense_score, dense_fed = coverage(case, codec, DensePolicy(window, memory, DENSE_MEASURE), chunk_frames)
        row = {"dense": {"coverage_db": round(dense_score, 2), "context_vs_dense": 1.0}}
        configs = [{"window_rule": r, "keep_threshold": 0.0} for r in WINDOW_RULES]
        configs += [{"window_rule": "fixed", "keep_threshold": t} for t in THRESHOLDS]
        for config in configs:
            policy = controller_for(spec, case.trajectory, window, **config)
            score_db, fed = coverage(case, codec, policy, chunk_frames)
            key = f"rule={config['window_rule']}" if config["keep_threshold"] == 0 else f"keep>={config['keep_threshold']}"
            row[key] = {"coverage_db": round(score_db, 2), "context_vs_dense": round(fed / max(dense_fed, 1), 3)}
        rows[case.trajectory.name] = row
    return rows


def controller_for(spec, trajectory, window: int, **context) -> ContextController:
    options = {"window_min": 1, "window_max": window, "similarity": DENSE_MEASURE, **context}
    return ContextController(Options.from_user({"context": options}).context, Plan(), memory_k=spec.memory,
                             fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect)


def score(run, dense, chunk_frames: int) -> dict:
    """PSNR vs dense (frames after the first chunk) and context frames fed relative to dense."""
    tail = slice(chunk_frames, None)
    per_frame = psnr(run.frames[tail], dense.frames[tail]).clamp_max(100.0)
    fed = sum(len(s.frames) for s in run.selections)
    dense_fed = sum(len(s.frames) for s in dense.selections)
    return {"psnr_db": round(per_frame.mean().item(), 2), "min_psnr_db": round(per_frame.min().item(), 2),
            "context_vs_dense": round(fed / max(dense_fed, 1), 3)}


def world_fidelity(name: str, window: int, chunks: int) -> dict:
    """Every rule and threshold on every trajectory for one tiny world; returns nested rows."""
    world = WORLDS[name].build(dataclasses.replace(WORLDS[name].PRESETS["tiny"], window=window))
    spec = world.spec
    rows = {}
    for trajectory_name in sorted(TRAJECTORIES):
        trajectory = make(trajectory_name, chunks * spec.chunk_frames)
        dense = generate(world, trajectory, DensePolicy(window, spec.memory, DENSE_MEASURE))
        row = {}
        for rule in WINDOW_RULES:
            controller = controller_for(spec, trajectory, window, window_rule=rule, keep_threshold=0.0)
            row[f"rule={rule}"] = score(generate(world, trajectory, controller), dense, spec.chunk_frames)
        for threshold in THRESHOLDS:
            controller = controller_for(spec, trajectory, window, window_rule="fixed", keep_threshold=threshold)
            row[f"keep>={threshold}"] = score(generate(world, trajectory, controller), dense, spec.chunk_frames)
        rows[trajectory_name] = row
        print(f"  {name} {trajectory_name}: done", flush=True)
    return rows


def mean_over_trajectories(rows: dict) -> dict:
    first = next(iter(rows.values()))
    return {
        config: {key: round(sum(r[config][key] for r in rows.values()) / len(rows), 3) for key in values}
        for config, values in first.items()
    }


def print_means(title: str, means: dict) -> None:
    print(title)
    for config, values in means.items():
        print(f"  {config:26s} " + "  ".join(f"{k}={v}" for k, v in values.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--window", type=int, default=6, help="window_max, and the dense policy's window")
    parser.add_argument("--memory", type=int, default=4, help="memory frames per chunk for the coverage measurement")
    parser.add_argument("--worlds", nargs="*", default=sorted(WORLDS), choices=sorted(WORLDS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    result = {"window_max": args.window, "chunks": args.chunks}
    print(f"dynamics of rendered content (window_max={args.window}):")
    result["render_dynamics"] = render_dynamics(args.chunks * 4, 4, args.window)
    for trajectory, row in result["render_dynamics"].items():
        print(f"  {trajectory:26s} " + "  ".join(f"{k}={v}" for k, v in row.items()))
    rows = render_coverage(args.chunks * 4, 4, args.window, args.memory)
    result["render_coverage"] = {"trajectories": rows, "mean": mean_over_trajectories(rows)}
    print_means("context coverage of rendered content, mean over trajectories:", result["render_coverage"]["mean"])
    result["fidelity"] = {}
    for name in args.worlds:
        rows = world_fidelity(name, args.window, args.chunks)
        result["fidelity"][name] = {"trajectories": rows, "mean": mean_over_trajectories(rows)}
        print_means(f"{name}: mean over trajectories (PSNR vs dense, dB; context fed vs dense)",
                    result["fidelity"][name]["mean"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print(f"done in {result['seconds']} s")


if __name__ == "__main__":
    main()
