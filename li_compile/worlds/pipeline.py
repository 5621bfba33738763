"""The chunk-by-chunk generation loop every reference world runs, and the dense context policy.

One chunk of an interactive world model, as both upstream families run it::

    selection = policy.select(chunk, past poses, chunk poses, past latents)   # which past frames
    context   = gather_context(history, selection, capacity)                  # static-shaped slots
    inputs    = world.inputs(context, chunk poses, chunk actions, first frame)
    x = noise
    for each sampler step:  v = model(x, sigma, **inputs);  x = update(x, v, sigma, sigma_next)
    history += x (the chunk's clean latent frames) and its poses

This loop is the only place that builds the context. A *context policy* decides which past
latent frames it feeds: ``DensePolicy`` mirrors upstream (a fixed recent window plus a fixed number
of memory frames retrieved by camera similarity). With ``accelerator=`` (a configured
``li_compile.Accelerator``) the loop is the README's: each chunk runs inside
``accelerator.chunk(...)``, whose controller selects the context and writes the plans, and whose
denoising cache is told each step.

Static shapes: the context is padded to ``capacity`` frame slots (right-aligned, padding first,
masked with a key-padding mask) so the model sees the same shapes on every chunk, from the first
one on, and ``torch.compile`` compiles it once per capacity. A runner may drop the mask of a
context that fills the largest capacity (``mask_full=False``, as the CUDA benchmarks do, so SDPA
can use flash; ``unmasked_capacity``): one more graph, compiled by ``warm_up``. Smaller capacities
keep their mask even when full: they serve the first chunks and pruned ones, and a second graph
each would cost more warm-up than flash saves there. A policy may ask for a smaller capacity
(``ContextSelection.capacity``, e.g. a controller's compaction buckets); ``None`` means the world's
full context (``spec.context_frames``).

``step_hook(chunk, step, model_call) -> output`` is called instead of the model at every step
(the default calls ``model_call()``); the fidelity tools use it to start from given frames.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from li_compile.controller.selection import ContextSelection, pad_frames, valid_slots
from li_compile.controller.similarity import similarity
from li_compile.options import ContextOptions
from li_compile.worlds.base import Context, World
from li_compile.worlds.sampling import sampler_update
from li_compile.worlds.trajectories import ACTION_DIM, Trajectory

if TYPE_CHECKING:
    from li_compile.accelerator import Accelerator, ChunkScope

# Upstream retrieves memory by field-of-view overlap (frustum_overlap estimates it); the dense baseline
# scores with the same cheap closed form as the controller by default (pose_proxy agrees with frustum
# overlap on 98.5% of keep decisions), so selection costs the same in both timed runs.
DENSE_MEASURE = ContextOptions().similarity

StepHook = Callable[[int, int, Callable[[], torch.Tensor]], torch.Tensor]


class ContextPolicy(Protocol):
    def select(self, chunk: int, poses: torch.Tensor, chunk_poses: torch.Tensor,
               latents: torch.Tensor) -> ContextSelection: ...


class DensePolicy:
    """Upstream's context: the last ``window`` frames, plus the ``memory`` past frames outside the
    window whose cameras best match the chunk's (highest similarity to any chunk camera, ``measure``
    of ``li_compile.controller.similarity``). Fixed counts: nothing is pruned."""

    def __init__(self, window: int, memory: int, measure: str = DENSE_MEASURE) -> None:
        if window < 0 or memory < 0:
            raise ValueError(f"DensePolicy needs window >= 0 and memory >= 0, got {window}, {memory}")
        self.window, self.memory, self.measure = window, memory, measure

    def select(self, chunk: int, poses: torch.Tensor, chunk_poses: torch.Tensor,
               latents: torch.Tensor) -> ContextSelection:
        """``poses: (N, 4, 4)`` of the past frames, ``chunk_poses: (F, 4, 4)``; ``latents`` unused."""
        n = poses.shape[0]
        recent = list(range(max(0, n - self.window), n))
        candidates = n - len(recent)
        k = min(self.memory, candidates)
        if k == 0:
            return ContextSelection(memory=[], recent=recent)
        bank = poses[:candidates]
        scores = torch.stack([similarity(p, bank, self.measure) for p in chunk_poses]).amax(0)
        memory = sorted(torch.topk(scores, k, sorted=True).indices.tolist())
        return ContextSelection(memory=memory, recent=recent)


def gather_context(latents: torch.Tensor, poses: torch.Tensor, selection: ContextSelection,
                   capacity: int, mask_full: bool = True) -> Context:
    """Pad the selected history frames into ``capacity`` slots, right-aligned (padding first).

    ``latents: (N, C, h, w)`` and ``poses: (N, 4, 4)`` of the history; raises ``ValueError`` when
    the selection repeats a frame, names one outside ``[0, N)`` or holds more than ``capacity``.
    ``mask_full=False``: a context that fills every slot comes with ``valid=None`` (the model
    attends without a key-padding mask, so SDPA may pick its flash kernel).
    """
    pad = capacity - len(selection.frames)
    ctx_latents = pad_frames(latents, selection, capacity)[None]
    ctx_poses = pad_frames(poses.float(), selection, capacity, torch.eye(4))[None]
    valid = valid_slots(selection, capacity)[None]
    frame_index = pad_frames(torch.arange(latents.shape[0], dtype=torch.float32), selection, capacity)[None]
    device = latents.device
    mask = None if not mask_full and pad == 0 else valid.to(device)
    return Context(ctx_latents, ctx_poses, mask, frame_index.to(device), selection.frames)


@dataclass
class Generation:
    """What ``generate`` returns.

    ``latents: (N, C, h, w)`` float32 CPU, every generated latent frame; ``poses: (N, 4, 4)``;
    ``frames: (N, 3, H, W)`` decoded pictures in [0, 1] (``None`` if not decoded);
    ``chunk_times``: seconds per chunk; ``selections``: the context of each chunk.
    """

    latents: torch.Tensor
    poses: torch.Tensor
    frames: torch.Tensor | None
    chunk_times: list[float]
    selections: list[ContextSelection]
    chunk_frames: int

    def chunk(self, c: int) -> slice:
        """The frame indices of chunk ``c``."""
        return slice(c * self.chunk_frames, (c + 1) * self.chunk_frames)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress_bar(items: Iterable, desc: str, enabled: bool = True) -> Iterable:
    """A tqdm progress bar over `items` when enabled and tqdm (the `examples` extra) is installed, else `items`."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def chunk_noise(world: World, chunk: int, seed: int) -> torch.Tensor:
    """Noise of one chunk: ``(steps + 1, 1, F, C, h, w)`` (the start plus one per renoise step),
    drawn on the CPU from ``seed`` and ``chunk`` so that every device and run draws the same."""
    spec = world.spec
    gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
    noise = torch.randn(spec.steps + 1, 1, spec.chunk_frames, *spec.latent_shape, generator=gen)
    return noise.to(world.device, spec.dtype)


def unmasked_capacity(world: World, accelerator: "Accelerator | None" = None) -> int:
    """The one context capacity whose full context drops its key-padding mask under ``mask_full=False``:
    the largest the loop may ask for (the accelerator's largest capacity bucket, else the world's
    context)."""
    controller = None if accelerator is None else accelerator.controller
    return world.spec.context_frames if controller is None else controller.warm_up_buckets()[-1]


def warm_up(world: World, capacities: Sequence[int], mask_full: bool = True, unmasked: int | None = None) -> None:
    """Call the model once at each context capacity (an empty context), so that compiled modules
    compile now, once per capacity, and never while a trajectory is timed. ``capacities``: e.g.
    ``(world.spec.context_frames,)`` for the dense policy, or a controller's capacity buckets.
    ``mask_full=False`` (as ``generate``'s): also once with a full context at ``unmasked`` (default:
    the largest of ``capacities``; ``unmasked_capacity``), which has no mask."""
    unmasked = max(capacities) if unmasked is None else unmasked
    spec = world.spec
    poses = torch.eye(4).expand(max([spec.chunk_frames, *capacities]), 4, 4)
    noise = chunk_noise(world, 0, 0)
    with torch.no_grad():
        for capacity in capacities:
            masked = mask_full or capacity != unmasked
            for filled in (0,) if masked else (0, capacity):
                history = torch.zeros(filled, *spec.latent_shape, device=world.device, dtype=spec.dtype)
                selection = ContextSelection([], list(range(filled)), capacity)
                context = gather_context(history, poses[:filled], selection, capacity, masked)
                inputs = world.inputs(context, poses[:spec.chunk_frames], torch.zeros(spec.chunk_frames, ACTION_DIM), 0)
                world.model(noise[0], spec.sigmas()[0].to(world.device, spec.dtype), **inputs)
    _sync(world.device)


def generate(
    world: World,
    trajectory: Trajectory,
    policy: ContextPolicy | None = None,
    chunks: int | None = None,
    *,
    accelerator: "Accelerator | None" = None,
    step_hook: StepHook | None = None,
    seed: int = 0,
    decode: bool = True,
    progress: bool = False,
    mask_full: bool = True,
) -> Generation:
    """Generate ``chunks`` chunks of ``world`` along ``trajectory`` (default: as many as it holds).

    ``policy``: which past frames each chunk sees (default ``DensePolicy`` with the world's window
    and memory); ``accelerator``: a configured ``li_compile.Accelerator`` of ``world.model`` that
    selects the context and drives the plans and the cache instead (``policy`` must be None then);
    ``step_hook``: see the module docstring; ``seed``: the noise; ``decode``: also
    return pictures (``world.decode``); ``mask_full=False``: a chunk whose context fills every slot
    of ``unmasked_capacity`` runs without a key-padding mask (``gather_context``; the compiled model
    then has one more graph, which ``warm_up(..., mask_full=False)`` compiles). Chunk ``c`` generates frames
    ``[c F, (c + 1) F)`` with the cameras ``trajectory.poses`` of those frames. Timing covers
    selection, inputs and all steps of the chunk (synchronised on CUDA).
    """
    spec = world.spec
    per_chunk = spec.chunk_frames
    available = len(trajectory) // per_chunk
    chunks = available if chunks is None else chunks
    if not 1 <= chunks <= available:
        raise ValueError(
            f"chunks must be in [1, {available}] for a {len(trajectory)}-frame trajectory "
            f"and {per_chunk} frames per chunk, got {chunks}"
        )
    if accelerator is not None and policy is not None:
        raise ValueError("give generate() a context policy or an accelerator, not both: the accelerator selects the context")
    policy = policy or DensePolicy(spec.window, spec.memory)
    unmasked = unmasked_capacity(world, accelerator)
    schedule = spec.sigmas().float()
    sigmas = schedule.to(world.device, spec.dtype)
    all_poses = trajectory.poses.float().cpu()
    all_actions = trajectory.actions()
    history = torch.zeros(chunks * per_chunk, *spec.latent_shape, device=world.device, dtype=spec.dtype)
    times: list[float] = []
    selections: list[ContextSelection] = []
    step_hook = step_hook or (lambda chunk, step, model_call: model_call())
    bar = progress_bar(range(chunks), spec.name, enabled=progress)
    with torch.no_grad():
        for c in bar:
            first = c * per_chunk
            chunk_poses = all_poses[first:first + per_chunk]
            noise = chunk_noise(world, c, seed)
            _sync(world.device)
            start = time.perf_counter()
            with _chunk_scope(accelerator, policy, c, all_poses[:first], chunk_poses, history[:first], schedule) as scope:
                selection = scope.selection
                capacity = spec.context_frames if selection.capacity is None else selection.capacity
                context = gather_context(history[:first], all_poses[:first], selection, capacity,
                                         mask_full or capacity != unmasked)
                inputs = world.inputs(context, chunk_poses, all_actions[first:first + per_chunk], first)
                x = noise[0]
                for s in range(spec.steps):
                    scope.step(s)
                    v = step_hook(c, s, partial(world.model, x, sigmas[s], **inputs))
                    x = sampler_update(spec.sampler, x, v, sigmas[s], sigmas[s + 1], noise[s + 1])
            history[first:first + per_chunk] = x[0]
            _sync(world.device)
            times.append(time.perf_counter() - start)
            selections.append(selection)
    latents = history.float().cpu()
    frames = world.decode(latents) if decode else None
    return Generation(latents, all_poses[:chunks * per_chunk], frames, times, selections, per_chunk)


class _PolicyScope:
    """A dense chunk's stand-in for ``ChunkScope``: the policy's selection, steps told to no one."""

    def __init__(self, selection: ContextSelection) -> None:
        self.selection = selection

    def step(self, step: int) -> None:
        pass


@contextlib.contextmanager
def _chunk_scope(accelerator: "Accelerator | None", policy: ContextPolicy, chunk: int, poses: torch.Tensor,
                 chunk_poses: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor
                 ) -> "Iterator[ChunkScope | _PolicyScope]":
    if accelerator is None:
        yield _PolicyScope(policy.select(chunk, poses, chunk_poses, latents))
        return
    with accelerator.chunk(chunk, poses, chunk_poses, latents, sigmas) as scope:
        yield scope
