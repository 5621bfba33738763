"""Training clips for the trained world: rendered trajectories and teacher-forced chunk batches.

A **clip** is one trajectory of ``li_compile.worlds.trajectories`` (exploration with revisits)
through its own procedural room (``training.scenes``, objects kept clear of the path),
rendered on the device. A **pool** holds many clips plus, for every chunk of every clip, the
context that ``DensePolicy`` would feed the generation loop (recent window + memory frames
retrieved by camera similarity), computed for all clips at once by ``dense_context_slots``.

A training example is one chunk of one clip: its clean latent frames (the target), and its
context as ``gather_context`` lays it out (right-aligned slots, padding first, zero latents and
identity poses on padding) but with ground-truth frames (teacher forcing), lightly noised so the
model tolerates its own imperfect frames at generation time. Memory is dropped from a fraction of
examples, so that "no memory" (``DensePolicy(window, 0)``) is a condition the model knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from li_compile.controller.poses import relative_pose
from li_compile.controller.similarity import similarity
from li_compile.worlds.base import WorldSpec
from li_compile.worlds.layers import camera_features
from li_compile.worlds.pipeline import DENSE_MEASURE
from li_compile.worlds.pixel_codec import PixelPatchCodec
from training.scenes import make_scenes, render
from li_compile.worlds.trajectories import ACTION_DIM, make

CONTEXT_NOISE = 0.1  # largest std of the Gaussian noise added to (unit-variance) context latents
MEMORY_DROPOUT = 0.15  # fraction of training examples whose memory frames are removed
PAIRS_PER_PASS = 1 << 12  # (clip, frame, frame) pairs scored at once by dense_context_slots
CLIPS_PER_TRAJECTORY = 4  # clips share camera paths (cheap variety: each clip has its own room)
# The paths the shipped weights were trained on; pinned so that a new trajectory does not change the training set.
TRAINING_TRAJECTORIES = ("loop", "orbit", "out_and_back", "random_walk_with_returns")
SCENE_SEED_STRIDE = 1_000_003  # scene seed of clip i: seed * stride + i (held-out seeds differ by seed)


@dataclass
class ClipPool:
    """Rendered clips on one device.

    ``frames: (P, T, 3, H, W)`` uint8; ``poses: (P, T, 4, 4)`` float32; ``actions: (P, T, 6)``;
    ``slots: (P, T // F, capacity)`` long: for chunk ``c`` the frame indices of its context slots
    (``-1`` = padding, right-aligned: padding, memory, recent), as ``DensePolicy`` picks them.
    """

    frames: torch.Tensor
    poses: torch.Tensor
    actions: torch.Tensor
    slots: torch.Tensor

    def __len__(self) -> int:
        return self.frames.shape[0]


def pairwise_similarity(poses: torch.Tensor, measure: str = DENSE_MEASURE) -> torch.Tensor:
    """``similarity`` of every frame against every frame of each clip: ``(P, T, 4, 4)`` -> ``(P, T, T)``.

    Entry ``[p, i, j]`` scores past camera ``j`` for current camera ``i``, as
    ``similarity(poses[p, i], poses[p, j:j+1], measure)`` does. Every measure depends on the
    relative pose only, so all pairs go through one call per ``PAIRS_PER_PASS`` as banks seen from
    an identity camera: batched, and the very same function the policies use.
    """
    p_count, t = poses.shape[:2]
    current = poses[:, :, None].expand(p_count, t, t, 4, 4).reshape(-1, 4, 4)
    past = poses[:, None, :].expand(p_count, t, t, 4, 4).reshape(-1, 4, 4)
    eye = torch.eye(4, device=poses.device)
    scores = [similarity(eye, relative_pose(current[i:i + PAIRS_PER_PASS], past[i:i + PAIRS_PER_PASS]), measure)
              for i in range(0, current.shape[0], PAIRS_PER_PASS)]
    return torch.cat(scores).reshape(p_count, t, t)


def dense_context_slots(poses: torch.Tensor, chunk_frames: int, window: int, memory: int,
                        measure: str = DENSE_MEASURE) -> torch.Tensor:
    """``DensePolicy(window, memory, measure)``'s context of every chunk of every clip:
    ``(P, T, 4, 4)`` -> ``(P, T // chunk_frames, window + memory)`` long frame indices, ``-1`` on
    padding (first).

    Chunk ``c`` (frames ``[c F, (c + 1) F)``) keeps the last ``window`` past frames and the
    ``memory`` older ones that best match any of its cameras, each group sorted by time.
    """
    p_count, t = poses.shape[:2]
    chunks, capacity = t // chunk_frames, window + memory
    overlap = pairwise_similarity(poses, measure).cpu()
    slots = torch.full((p_count, chunks, capacity), -1, dtype=torch.long)
    for c in range(chunks):
        first = c * chunk_frames
        recent = torch.arange(max(0, first - window), first)
        candidates = first - len(recent)
        k = min(memory, candidates)
        if k > 0:
            scores = overlap[:, first:first + chunk_frames, :candidates].amax(1)  # (P, candidates)
            chosen = torch.topk(scores, k, sorted=True).indices.sort(-1).values
            slots[:, c, capacity - len(recent) - k:capacity - len(recent)] = chosen
        if len(recent):
            slots[:, c, capacity - len(recent):] = recent
    return slots


def make_pool(clips: int, frames: int, spec: WorldSpec, seed: int, device: torch.device | str,
              image_size: int, batch: int = 64) -> ClipPool:
    """Render ``clips`` clips of ``frames`` frames on ``device``. Clip ``i`` walks trajectory
    ``i % n`` of ``n = ceil(clips / CLIPS_PER_TRAJECTORY)`` paths, path ``j`` being
    ``make(name, frames, seed * clips + j)`` (names cycling through ``TRAINING_TRAJECTORIES``), through its
    own room ``seed * SCENE_SEED_STRIDE + i``. Deterministic per ``seed``."""
    if frames < 2 * spec.chunk_frames:
        raise ValueError(f"clips need at least 2 chunks ({2 * spec.chunk_frames} frames) to train on, got {frames}")
    names = sorted(TRAINING_TRAJECTORIES)
    paths = -(-clips // CLIPS_PER_TRAJECTORY)
    trajectories = [make(names[j % len(names)], frames, seed * clips + j) for j in range(paths)]
    path_poses = torch.stack([tr.poses for tr in trajectories])
    path_slots = dense_context_slots(path_poses.to(device), spec.chunk_frames, spec.window, spec.memory)
    path_of_clip = torch.arange(clips) % paths
    poses = path_poses[path_of_clip].to(device)
    rendered = []
    for start in range(0, clips, batch):
        count = min(batch, clips - start)
        seeds = [seed * SCENE_SEED_STRIDE + start + j for j in range(count)]
        centres = [trajectories[int(path_of_clip[start + j])].poses[:, :3, 3] for j in range(count)]
        images = render(make_scenes(seeds, clear_points=centres), poses[start:start + count], size=image_size)
        rendered.append((images * 255).round().to(torch.uint8))
    actions = torch.stack([tr.actions() for tr in trajectories])[path_of_clip].to(device)
    return ClipPool(torch.cat(rendered), poses, actions, path_slots[path_of_clip].to(device))


@dataclass
class Rollouts:
    """Clips of a pool as the world generates them (``training.roll_out``): ``clips: (R,)`` pool
    indices, ``latents: (R, T, C, h, w)``, the true first chunk followed by generated chunks."""

    clips: torch.Tensor
    latents: torch.Tensor


def chunk_frame_indices(chunk: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """The frame indices of chunks ``chunk (B,)`` of ``chunk_frames`` frames each: ``(B, chunk_frames)``."""
    return chunk[:, None] * chunk_frames + torch.arange(chunk_frames, device=chunk.device)


def chunk_inputs(pool: ClipPool, clip: torch.Tensor, chunk: torch.Tensor, slots: torch.Tensor,
                 context: torch.Tensor, spec: WorldSpec, codec: PixelPatchCodec) -> dict[str, torch.Tensor]:
    """The example of chunk ``chunk (B,)`` of clip ``clip (B,)`` with context slots ``slots (B, K)``
    (frame indices, ``-1`` = padding) holding the latents ``context (B, K, C, h, w)``: the clean
    chunk ``target`` and the model's keyword inputs as ``HYWorldPlay.inputs`` builds them (padding
    zeroed, identity poses on padding, cameras relative to the chunk's first, no actions on context)."""
    device, per_chunk = pool.frames.device, spec.chunk_frames
    batch = clip.shape[0]
    valid = slots >= 0
    chunk_index = chunk_frame_indices(chunk, per_chunk)
    rows = clip[:, None]
    eye = torch.eye(4, device=device)
    context_poses = torch.where(valid[..., None, None], pool.poses[rows, slots.clamp_min(0)], eye)
    chunk_poses = pool.poses[rows, chunk_index]
    camera = camera_features(chunk_poses[:, :1], torch.cat([context_poses, chunk_poses], 1))
    actions = torch.cat([torch.zeros(batch, slots.shape[1], ACTION_DIM, device=device),
                         pool.actions[rows, chunk_index]], 1)
    return {
        "target": codec.encode(pool.frames[rows, chunk_index].float() / 255),
        "context": context * valid[..., None, None, None],
        "context_valid": valid,
        "camera": camera,
        "actions": actions,
    }


def sample_batch(pool: ClipPool, batch: int, spec: WorldSpec, codec: PixelPatchCodec,
                 generator: torch.Generator, rollouts: Rollouts | None = None,
                 revisit_fraction: float = 0.0) -> dict[str, torch.Tensor]:
    """One batch of chunks (``generator`` on the pool's device), as ``chunk_inputs`` lays them out.

    Returns ``target: (B, F, C, h, w)`` clean chunk latents and the model's keyword inputs
    ``context (B, K, C, h, w)``, ``context_valid (B, K)``, ``camera (B, K + F, 12)`` (relative to
    the chunk's first camera, as ``HYWorldPlay.inputs``), ``actions (B, K + F, 6)`` (zero on
    context). Chunk 0 (no context: the generation's given prefix) is never a target. The context
    holds the true frames (teacher forcing), or with ``rollouts`` the frames the world generated
    for those clips (self-forcing: the context a generation really sees); either lightly noised.
    ``revisit_fraction`` of the teacher-forced examples are exact revisits: their memory slots
    hold the chunk's own frames at the chunk's own cameras, as when the camera comes back to a
    place it saw (``loop`` at its period); the others keep ``DensePolicy``'s memory.
    """
    device = pool.frames.device
    chunks = pool.slots.shape[1]
    source = len(pool) if rollouts is None else len(rollouts.clips)
    row = torch.randint(0, source, (batch,), generator=generator, device=device)
    clip = row if rollouts is None else rollouts.clips[row]
    chunk = torch.randint(1, chunks, (batch,), generator=generator, device=device)
    slots = pool.slots[clip, chunk].clone()  # (B, K)
    if revisit_fraction > 0 and rollouts is None:
        revisit = torch.rand(batch, generator=generator, device=device) < revisit_fraction
        own = chunk_frame_indices(chunk, spec.chunk_frames)
        count = min(spec.memory, spec.chunk_frames)
        slots[:, :count] = torch.where(revisit[:, None], own[:, :count], slots[:, :count])
    drop = torch.rand(batch, generator=generator, device=device) < MEMORY_DROPOUT
    slots[:, :spec.memory] = torch.where(drop[:, None], -1, slots[:, :spec.memory])
    index = slots.clamp_min(0)
    if rollouts is None:
        context = codec.encode(pool.frames[clip[:, None], index].float() / 255)
    else:
        context = rollouts.latents[row[:, None], index]
    noise_std = CONTEXT_NOISE * torch.rand(batch, 1, 1, 1, 1, generator=generator, device=device)
    context = context + noise_std * torch.randn(context.shape, generator=generator, device=device)
    return chunk_inputs(pool, clip, chunk, slots, context, spec, codec)
