"""Fidelity of the trained world against the renderer's ground truth, on held-out rooms and paths.

A **case** is a trajectory through a room neither seen in training (held-out seeds) with its
ground-truth frames. The world starts from the first chunk's true frames (image-to-world, as the
real models start from a picture) and generates the rest with the shared loop
``li_compile.worlds.pipeline.generate``; ``li_compile.worlds.fidelity.prefix_hook`` feeds the true first chunk through the
loop's ``step_hook`` (the Euler steps of chunk 0 land exactly on it), so nothing else changes.

Scores (per-frame PSNR in dB and SSIM on RGB in [0, 1] of ``report_tools``, averaged over the
generated frames; ``psnr_video_*``: the PSNR of the squared error over all of them, where a frame
that happens to be exact adds its zero error instead of ``PSNR_CAP_DB``):
``dense`` (``DensePolicy``), ``repeat_last`` (the trivial predictor: every future frame is the last
given frame; ``repeat_last_exact_frames`` counts the frames it gets exactly right, where the camera
is back at the last given view) and, on **revisit** frames (cameras that returned to a place last
seen before the recent window, so only memory can bring it back), dense with memory against
``DensePolicy(window, 0)`` (memory removed).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from li_compile.controller.poses import camera_centers, view_directions
from li_compile.worlds.base import OUTPUTS, World
from li_compile.worlds.fidelity import HELD_OUT_SEED, prefix_hook
from li_compile.worlds.hy_worldplay import TRAINED, TRAINED_AR
from li_compile.worlds.pipeline import ContextPolicy, DensePolicy, StepHook, generate
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.report_tools import frame_psnr, psnr, repeat_last, ssim
from li_compile.worlds.trained import (
    AR_WEIGHTS_PATH, PIXEL_STRIDE, TRAINED_AR_SPEC, TRAINED_SPEC, WEIGHTS_PATH, image_size, load_trained,
)
from li_compile.worlds.trajectories import Trajectory, make
from training.data import TRAINING_TRAJECTORIES
from training.scenes import make_scene, render

REVISIT_DISTANCE = 0.05  # world units: a camera this close to an earlier one (and facing alike) revisits it
REVISIT_COS = 0.998  # cosine between view directions of a revisit (about 3.6 degrees)


@dataclass
class Case:
    """A held-out trajectory and its true frames ``(T, 3, H, W)`` (CPU, [0, 1])."""

    trajectory: Trajectory
    scene_seed: int
    frames: torch.Tensor


def held_out_cases(frames: int, per_trajectory: int, image_size: int, names: tuple[str, ...] | None = None,
                   device: torch.device | str = "cpu") -> list[Case]:
    """``per_trajectory`` cases of each trajectory name (default: the training paths,
    ``TRAINING_TRAJECTORIES``, so published numbers keep their meaning when paths are added), ``frames``
    long, rendered at ``image_size`` on ``device`` (frames returned on the CPU) with objects kept
    clear of the path."""
    cases = []
    for n, name in enumerate(sorted(names or TRAINING_TRAJECTORIES)):
        for i in range(per_trajectory):
            seed = HELD_OUT_SEED + 100 * n + i
            cases.append(render_case(make(name, frames, seed), seed, image_size, device))
    return cases


def render_case(trajectory: Trajectory, scene_seed: int, image_size: int, device: torch.device | str = "cpu") -> Case:
    """Room ``scene_seed`` (objects kept clear of the path) rendered along ``trajectory`` on ``device``."""
    scene = make_scene(scene_seed, clear_points=camera_centers(trajectory.poses))
    truth = render(scene, trajectory.poses.to(device), trajectory.fov_y_deg, image_size).cpu()
    return Case(trajectory, scene_seed, truth)


def rollout(world: World, codec: PixelPatchCodec, case: Case, policy: ContextPolicy | None = None,
            seed: int = 0, then: StepHook | None = None) -> torch.Tensor:
    """Frames ``(T, 3, H, W)`` generated along the case's trajectory from its true first chunk
    (``then``: the step hook of later chunks)."""
    prefix = codec.encode(case.frames[:world.spec.chunk_frames])
    hook = prefix_hook(world, prefix, seed, then)
    result = generate(world, case.trajectory, policy, step_hook=hook, seed=seed, decode=False)
    return codec.decode(result.latents)


def revisit_frames(poses: torch.Tensor, chunk_frames: int, window: int) -> torch.Tensor:
    """Which frames ``(T,)`` bool return to a camera last seen before their chunk's recent window.

    Frame ``i`` of chunk ``c`` revisits when some frame ``j < c * chunk_frames - window`` has its
    centre within ``REVISIT_DISTANCE`` and its view direction within ``REVISIT_COS``.
    """
    centres, dirs = camera_centers(poses), view_directions(poses)
    close = (torch.cdist(centres, centres) < REVISIT_DISTANCE) & (dirs @ dirs.T > REVISIT_COS)
    frames = torch.arange(len(poses))
    horizon = (frames // chunk_frames) * chunk_frames - window  # frames before this are out of the window
    earlier = frames[None, :] < horizon[:, None]
    return (close & earlier).any(-1)


def evaluate(world: World, codec: PixelPatchCodec, cases: list[Case], seed: int = 0) -> dict:
    """Scores of ``world`` on ``cases``: per case and averaged (see the module docstring).

    Returns ``{"cases": [...], "mean": {...}}`` with keys ``psnr_dense``, ``psnr_repeat_last``,
    ``ssim_dense``, ``ssim_repeat_last``, ``psnr_video_dense``, ``psnr_video_repeat_last``
    (``repeat_last_exact_frames`` per case only), and on revisit frames ``psnr_revisit_memory``,
    ``psnr_revisit_no_memory`` (per-frame mean) and ``psnr_video_revisit_memory``,
    ``psnr_video_revisit_no_memory`` (over all of them) (absent where a case has no revisit frame).
    """
    spec = world.spec
    rows = []
    for case in cases:
        truth = case.frames
        generated = slice(spec.chunk_frames, len(truth) // spec.chunk_frames * spec.chunk_frames)
        dense = rollout(world, codec, case, DensePolicy(spec.window, spec.memory), seed)
        repeat = repeat_last(truth, generated.start, generated.stop)
        row = {
            "trajectory": case.trajectory.name, "scene_seed": case.scene_seed,
            "psnr_dense": frame_psnr(dense[generated], truth[generated]),
            "psnr_repeat_last": frame_psnr(repeat, truth[generated]),
            "ssim_dense": ssim(dense[generated], truth[generated]),
            "ssim_repeat_last": ssim(repeat, truth[generated]),
            "psnr_video_dense": psnr(dense[generated], truth[generated]),
            "psnr_video_repeat_last": psnr(repeat, truth[generated]),
            "repeat_last_exact_frames": int((repeat == truth[generated]).flatten(1).all(1).sum()),
        }
        revisits = revisit_frames(case.trajectory.poses, spec.chunk_frames, spec.window)[:len(dense)]
        revisits[:spec.chunk_frames] = False
        if revisits.any():
            no_memory = rollout(world, codec, case, DensePolicy(spec.window, 0), seed)
            row["revisit_frames"] = int(revisits.sum())
            seen = truth[:len(dense)][revisits]
            row["psnr_revisit_memory"] = frame_psnr(dense[revisits], seen)
            row["psnr_revisit_no_memory"] = frame_psnr(no_memory[revisits], seen)
            row["psnr_video_revisit_memory"] = psnr(dense[revisits], seen)
            row["psnr_video_revisit_no_memory"] = psnr(no_memory[revisits], seen)
        rows.append(row)
    keys = sorted({k for row in rows for k in row if k.startswith(("psnr", "ssim"))})
    mean = {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in keys}
    return {"cases": rows, "mean": mean}


PRESET_SPECS = {TRAINED: (TRAINED_SPEC, WEIGHTS_PATH), TRAINED_AR: (TRAINED_AR_SPEC, AR_WEIGHTS_PATH)}


def add_case_arguments(parser: argparse.ArgumentParser, per_trajectory: int) -> None:
    """The flags of a held-out evaluation of a trained world: ``--preset --weights --output --device
    --frames --per-trajectory`` (the benchmarks' shared command line)."""
    parser.add_argument("--preset", choices=sorted(PRESET_SPECS), default=TRAINED)
    parser.add_argument("--weights", type=Path, default=None, help="default: the preset's shipped weights")
    parser.add_argument("--output", choices=OUTPUTS, default=TRAINED_SPEC.output,
                        help="what the weights' network predicts (as trained: train_world.py --output)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=48, help="frames per trajectory (12 chunks of 4)")
    parser.add_argument("--per-trajectory", type=int, default=per_trajectory, help="held-out cases per trajectory name")


def trained_world_and_cases(args: argparse.Namespace, names: tuple[str, ...] | None = None
                            ) -> tuple[World, PixelPatchCodec, list[Case]]:
    """The trained world of ``args.preset`` with ``args.weights``, its pixel codec, and the held-out
    cases the flags of ``add_case_arguments`` ask for (trajectory ``names``, default all)."""
    spec, shipped = PRESET_SPECS[args.preset]
    world = load_trained(args.device, args.weights or shipped, replace(spec, output=args.output))
    cases = held_out_cases(args.frames, args.per_trajectory, image_size(spec), names, args.device)
    return world, PixelPatchCodec(PIXEL_STRIDE), cases
