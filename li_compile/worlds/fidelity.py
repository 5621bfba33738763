"""Generation from given frames, and the ground truth of a trained-world run (the examples' shared parts).

``prefix_hook`` makes a generation start from given clean frames (image-to-world, as the real
models start from a picture); ``trained_truth`` renders the true frames of a trained world's run.
The renderer and the held-out evaluations live in the repository's ``training/`` folder (not
installed): ``trained_truth`` works from a clone of the repository.
"""

from __future__ import annotations

import torch

from li_compile.worlds.base import World
from li_compile.worlds.pipeline import StepHook, chunk_noise
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.trajectories import Trajectory

HELD_OUT_SEED = 900_000  # scene and trajectory seeds of held-out cases start here (training uses small seeds)


def trained_truth(world: World, trajectory: Trajectory, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth for a run of the trained world along ``trajectory`` (e.g. an example's): the
    frames ``(T, 3, H, W)`` of held-out room ``HELD_OUT_SEED + seed``, and chunk 0's clean latents
    (the run starts from them through ``prefix_hook``, as ``rollout`` does)."""
    from li_compile.worlds.trained import PIXEL_STRIDE, image_size

    try:
        from training.fidelity import render_case  # the renderer: the repository's training/ folder
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the trained worlds' ground truth needs the renderer in the repository's "
                                  "training/ folder: run from the repository root with it on the path "
                                  "(python -m examples.hy_worldplay, or PYTHONPATH=.)") from exc

    case = render_case(trajectory, HELD_OUT_SEED + seed, image_size(world.spec))
    return case.frames, PixelPatchCodec(PIXEL_STRIDE).encode(case.frames[:world.spec.chunk_frames])


def prefix_hook(world: World, prefix: torch.Tensor, seed: int, then: StepHook | None = None) -> StepHook:
    """A ``step_hook`` that makes the first chunks come out as ``prefix (k F, C, h, w)`` (clean
    latents of ``k`` whole chunks; ``k = 1``: the given first chunk, more: a teacher-forced history).

    The Euler steps of chunk ``c < k`` from ``chunk_noise(world, c, seed)`` along the constant
    velocity ``noise - prefix`` end exactly at the prefix; later chunks call ``then`` (default: the model).
    """
    if world.spec.sampler != "euler":
        raise ValueError(f"prefix_hook needs the euler sampler, got {world.spec.sampler!r}")
    per_chunk, shape = world.spec.chunk_frames, tuple(world.spec.latent_shape)
    if prefix.ndim != 4 or tuple(prefix.shape[1:]) != shape or prefix.shape[0] % per_chunk or not len(prefix):
        raise ValueError(f"prefix must be (k * {per_chunk}, {', '.join(map(str, shape))}) latents of whole chunks, "
                         f"got {tuple(prefix.shape)}")
    velocities = []
    for c in range(prefix.shape[0] // per_chunk):
        noise = chunk_noise(world, c, seed)[0]
        velocities.append(noise - prefix[c * per_chunk:(c + 1) * per_chunk][None].to(noise))

    def hook(chunk: int, step: int, model_call):
        if chunk < len(velocities):
            return velocities[chunk]
        return then(chunk, step, model_call) if then is not None else model_call()

    return hook
