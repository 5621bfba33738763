"""Per-chunk, per-step host decisions of the denoising cache: serve a stored output or compute.

Each accelerated model owns one ``DenoiseRuntime`` (``Accelerator.denoise``); its chunk scope
(``with accelerator.chunk(...)``) brackets each chunk with ``begin_chunk`` / ``end_chunk``.
Every model call that the sampler pass wrapped (``li_compile.passes.sampler``) goes through
``runtime.step``: the n-th call of a runner in a chunk is denoising step n, unless the loop tells
the step (``set_step``, as ``ChunkScope.step`` does; then several calls per step, such as
classifier-free guidance as separate calls, are kept apart). On the first early step
(``step < reuse_limit``: ``cache.reuse_steps``, by default every step but the last) the chunk is
looked up once per stamp; on a revisit hit the early steps
return the stored output of the matched past chunk and the model does not run; otherwise the model
runs and its early outputs are stored under the chunk's cameras. A hit also needs the same cache
key: the weights generation and conditioning digest (``li_compile.cache_key``), the sigma
schedule, and the latent's shape, dtype and device. A chunk with a non-finite stored output is never
served: checked on the device as it is stored, and read before the next lookup, which drops such an
entry (no host-device sync per step or at a chunk's end; the read waits only for the early step that
stored it). Outside ``begin_chunk`` / ``end_chunk``, or with gradients enabled (a served output would cut the gradient), nothing is cached:
the model always runs. All of this happens on the host, between
calls of compiled graphs, so hits and misses never change anything Dynamo guards on.

What is stored (``options.cache.stored``):

- ``"x0"`` (default; needs the chunk's ``sigmas``): the clean-latent prediction ``x0 = x - sigma * v``
  of a flow-matching velocity model (both reference worlds), served back as ``v = (x - x0) / sigma``
  against the *current* latent ``x``. The new chunk keeps its own noise; reusing ``v`` itself would
  mix the past chunk's noise into this one. For a model that predicts ``v = noise - x0`` well this
  is the right reuse (a toy denoiser that does, 4 steps, 1 reused: 91 dB against dense, raw: 59 dB).
  Per-frame noise levels (diffusion forcing: ``sigmas (steps + 1, F)``, each frame on its own
  schedule) convert frame by frame along the latent's frame axis, and a frame is only ever served
  from a past frame that was on the same schedule (``denoise_cache``): at every step it was at the
  noise level this frame is at now.
- ``"raw"`` (also whenever ``sigmas`` are not given): the model output, served unchanged. Better for
  a model whose velocity ignores its input latent: the random-weight tiny worlds (reuse 1 of 4
  steps: raw 38-39 dB, x0 31-32 dB against dense; ``benchmarks/denoise_cache.py``).

The stamp records which, so the two never mix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import math
from typing import Callable, Hashable, Iterator, Sequence

import torch

from li_compile.controller.poses import validate_poses
from li_compile.denoise_cache import DenoiseCache, Entry, Stamp, chunk_poses
from li_compile.kernels.block_layout import whole_number
from li_compile.options import CacheOptions
from li_compile.reporting import ChunkStats

Level = float | tuple[float, ...]  # one step's noise level: the chunk's, or one per frame (diffusion forcing)
UNKNOWN_STEPS_STORED = 64  # steps a chunk stores while the step count is unknown (the first without sigmas)
AUTO_CALIBRATION_HITS = 2  # reuse_steps="auto": revisits computed in full to measure what serving costs
PSNR_CAP_DB = 100.0  # PSNR of identical predictions


@dataclass
class AutoReuse:
    """What ``reuse_steps="auto"`` measured: per early step, the lowest PSNR (dB) of the prediction
    the cache would have served against the fresh one over the calibration revisits, and the number
    of steps chosen from them (None while calibrating)."""

    worst_db: dict[int, float] = field(default_factory=dict)
    hits: int = 0
    chosen: int | None = None

    def record(self, measured: dict[int, float], target_db: float, most: int) -> None:
        """Add one calibration revisit; after ``AUTO_CALIBRATION_HITS`` choose the most steps
        ``k <= most`` whose served predictions all scored at least ``target_db``."""
        for step, db in measured.items():
            self.worst_db[step] = min(self.worst_db.get(step, PSNR_CAP_DB), db)
        self.hits += 1
        if self.hits >= AUTO_CALIBRATION_HITS:
            k = 0
            while k < most and self.worst_db.get(k, -math.inf) >= target_db:
                k += 1
            self.chosen = k

    def summary(self) -> dict[str, object]:
        return {"chosen": "calibrating" if self.chosen is None else self.chosen,
                "worst_db": {step: round(db, 1) for step, db in sorted(self.worst_db.items())}}


@dataclass
class _Chunk:
    """The chunk being generated: its cameras, schedule, looked-up entries and step counters."""

    chunk: int
    poses: torch.Tensor
    sigmas: list[Level] | None
    start: tuple[int, int, int, int, int]  # cache hits, misses, evictions, near misses, near hits at begin_chunk
    matches: dict[Stamp, Entry | None] = field(default_factory=dict)
    served: dict[Stamp, int] = field(default_factory=dict)  # early steps served from each match
    opened: dict[Stamp, Entry] = field(default_factory=dict)
    finite: dict[Stamp, list[torch.Tensor]] = field(default_factory=dict)  # per stored output, on its device
    measured: dict[int, float] = field(default_factory=dict)  # reuse_steps="auto": step -> served vs fresh dB
    levels: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> per-frame sigma, shaped to broadcast
    calls: dict[Hashable, int] = field(default_factory=dict)
    stamp_calls: dict[Hashable, int] = field(default_factory=dict)  # (runner, step, stamp) -> calls so far
    step: int | None = None  # told by the loop (set_step), else counted per runner
    reused: int = 0
    computed: int = 0
    last_served: int = -1  # the latest step served from the cache


class DenoiseRuntime:
    """Host state of the denoising cache: the cache itself and the chunk being generated."""

    def __init__(self, options: CacheOptions) -> None:
        self.options = options
        self.cache = DenoiseCache(options.capacity)
        self.reset()

    def reset(self) -> None:
        """Forget every entry, the chunk statistics and any open chunk (the capacity stays)."""
        self.cache = DenoiseCache(self.cache.capacity)
        self.history: list[ChunkStats] = []
        self.chunks_begun = 0  # chunks opened so far: what the cache key's once-per-chunk reads are keyed on
        self._chunk: _Chunk | None = None
        self._previous: torch.Tensor | None = None  # the last camera of the chunk closed last (continues_path)
        self._steps_seen: int | None = None  # fewest steps a chunk without sigmas ran (reuse_limit)
        self._unchecked: list[tuple[Entry, torch.Tensor]] = []  # closed chunks' entries, each with its device flag: all finite
        self._outer = False  # a boundary-cached call is computing (outer_call)
        self.auto = AutoReuse() if self.options.reuse_steps == "auto" else None

    @property
    def active(self) -> bool:
        """Whether a chunk is open (between ``begin_chunk`` and ``end_chunk``)."""
        return self._chunk is not None

    def matched(self) -> bool:
        """Whether a call of the open chunk found a cache match (a hit or a near hit) so far."""
        return self._chunk is not None and any(e is not None for e in self._chunk.matches.values())

    def begin_chunk(self, chunk: int, poses: torch.Tensor, sigmas: Sequence[float] | torch.Tensor | None = None) -> None:
        """Open ``chunk``: ``poses`` ``(F, 4, 4)`` are its frames' cameras (camera-to-world);
        ``sigmas`` ``(steps + 1,)`` its noise schedule (``sigmas[i]``: noise level of the latent
        entering step ``i``), or ``(steps + 1, F)`` one per frame (diffusion forcing), or None to
        store raw outputs. A still-open chunk is ended first."""
        self.open_chunk(chunk, *self.check_chunk(poses, sigmas))

    def open_chunk(self, chunk: int, poses: torch.Tensor, schedule: list[Level] | None) -> None:
        """``begin_chunk`` with the cameras and schedule ``check_chunk`` returned for it."""
        if self._chunk is not None:
            self.end_chunk()
        s = self.cache.stats
        self._chunk = _Chunk(chunk, poses, schedule, (s.hits, s.misses, s.evictions, s.near_misses, s.near_hits))
        self.chunks_begun += 1

    @staticmethod
    def check_chunk(poses: torch.Tensor,
                    sigmas: Sequence[float] | torch.Tensor | None) -> tuple[torch.Tensor, list[Level] | None]:
        """A chunk's cameras ``(F, 4, 4)`` and schedule as ``begin_chunk`` keeps them (``check_sigmas``);
        ``ValueError`` naming what is wrong with either."""
        poses = chunk_poses(validate_poses(poses, "chunk poses"))
        return poses, None if sigmas is None else check_sigmas(sigmas, poses.shape[0])

    def end_chunk(self, failed: bool = False) -> ChunkStats:
        """Close the open chunk and return its statistics (also appended to ``history``). A chunk
        that ``failed`` (raised before its end) keeps none of its outputs: its statistics say
        "interrupted"."""
        if self._chunk is None:
            raise ValueError("end_chunk() without begin_chunk(): no chunk is open")
        c, s = self._chunk, self.cache.stats
        if not failed and c.sigmas is not None and c.step is not None and (
                c.step != len(c.sigmas) - 2 or c.last_served >= c.step):  # its steps were numbered wrongly
            self.end_chunk(failed=True)  # keeps nothing: its outputs are stored under the wrong steps
            steps = len(c.sigmas) - 1
            what = (f"its last step told, {c.step}, was served from the cache" if c.last_served >= c.step
                    else f"its last step told is {c.step}")
            raise ValueError(f"chunk {c.chunk}: {what}, but its sigmas give {steps} steps: tell each step's number "
                             f"with chunk.step(i), 0 to {steps - 1}, once per step (the last step always computes); "
                             "the chunk keeps nothing in the cache")
        if failed:
            for entry in c.opened.values():
                self.cache.discard(entry)
            stats = ChunkStats(c.chunk, {"cache": "interrupted", "steps_reused": c.reused, "steps_computed": c.computed,
                                         "cache_entries": len(self.cache), "cache_bytes": self.cache.nbytes})
            self.history.append(stats)
            self._chunk = None
            return stats
        for stamp, flags in c.finite.items():  # read before the next lookup (_drop_non_finite): no sync here
            self._unchecked.append((c.opened[stamp], torch.stack(flags).all()))
        hit = [e.chunk for e in c.matches.values() if e is not None]
        near = s.near_hits > c.start[4]  # the cache counted a near hit in this chunk
        calibrating = self.auto is not None and self.auto.chosen is None and bool(c.measured)
        if calibrating:
            self.auto.record(c.measured, self.options.reuse_target_db, self.reuse_limit())  # the steps it measured
        kind = "calibration" if calibrating else "near hit" if near else "hit"
        off = None if c.matches else self._off_reason(c)
        stats = ChunkStats(
            c.chunk,
            {
                "cache": kind if hit else ("miss" if c.matches else "off"),
                **({"cache_off": off} if off else {}),
                "reused_chunk": hit[0] if hit else None,
                "steps_reused": c.reused,
                "steps_computed": c.computed,
                "cache_hits": s.hits - c.start[0],
                "cache_misses": s.misses - c.start[1],
                "cache_evictions": s.evictions - c.start[2],
                "cache_near_misses": s.near_misses - c.start[3],  # partial revisits, computed in full
                "cache_near_hits": s.near_hits - c.start[4],  # near revisits: their first near_reuse_steps served
                "cache_entries": len(self.cache),
                "cache_bytes": self.cache.nbytes,
                **({"reuse_auto": self.auto.summary()} if self.auto is not None else {}),
            },
        )
        self.history.append(stats)
        self._chunk, self._previous = None, c.poses[-1]
        if c.sigmas is None:
            self._note_steps(c)
        return stats

    def _off_reason(self, c: "_Chunk") -> str | None:
        """Why a chunk of an enabled cache looked nothing up, where its schedule says so."""
        if not self.options.enabled or c.sigmas is None or self.reuse_limit() > 0 or c.computed == 0:
            return None
        if self.options.stored == "x0" and _clean(c.sigmas[0]):
            return ("sigmas[0] is 0: with cache.stored='x0' no step from the first at noise level 0 is served "
                    "(sigmas run from the noisiest level down to 0)")
        return None

    def _note_steps(self, c: "_Chunk") -> None:
        """Learn from a closed chunk without sigmas how many steps a chunk runs (the fewest seen), so
        that later chunks never serve their last step; ``ValueError`` if this one served it (it ran
        fewer steps than the chunks before it)."""
        if c.step is not None:
            ran = 1 + max((step for (_, step) in c.calls), default=-1)
        else:
            ran = max(c.calls.values(), default=0)
        if ran == 0:
            return
        self._steps_seen = ran if self._steps_seen is None else min(self._steps_seen, ran)
        if c.last_served >= ran - 1:
            raise ValueError(f"chunk {c.chunk} ran {ran} denoising steps and its last was served from the cache: "
                             "chunks before it ran more steps, and without sigmas the cache knows the count only "
                             "from them; pass the chunk's sigmas to li.chunk(...) when the step count varies")

    @contextlib.contextmanager
    def outer_call(self) -> Iterator[None]:
        """While a call cached at the model's boundary (``li_compile.module_cache``) computes, the
        graph-level runners inside it only compute: the outer call is the step."""
        self._outer, before = True, self._outer
        try:
            yield
        finally:
            self._outer = before

    def set_step(self, step: int) -> None:
        """Tell the open chunk that denoising ``step`` starts: model calls until the next
        ``set_step`` belong to it (the 1st, 2nd, ... call of a runner in it are told apart, so a
        step may call the model more than once). Without it, a runner's n-th call is step n."""
        c = self._chunk
        if c is None:
            raise ValueError("set_step() without begin_chunk(): no chunk is open")
        number = whole_number(step)
        if number is None or number < 0:
            raise ValueError(f"chunk.step(i) takes the denoising step about to run, an int >= 0, got {step!r}")
        step = number
        if c.sigmas is not None and step >= len(c.sigmas) - 1:
            raise ValueError(f"chunk.step({step}): the chunk's sigmas give {len(c.sigmas) - 1} steps, numbered 0 to "
                             f"{len(c.sigmas) - 2}")
        if c.step is not None and step < c.step:
            raise ValueError(f"chunk.step({step}) after chunk.step({c.step}): the steps of a chunk are told in order")
        c.step = step

    def reuse_limit(self, steps: int | None = None) -> int:
        """How many early steps may be served in the open chunk: ``reuse_steps`` (``None``: every step
        but the last), but never the last step. The step count comes from ``steps``, the chunk's
        ``sigmas``, or else the fewest steps an earlier chunk without sigmas ran; before any did, the
        chunk stores its first ``reuse_steps`` (else ``UNKNOWN_STEPS_STORED``) steps and can match
        nothing (no entry of a chunk without sigmas exists yet). With ``"x0"`` stored, never a step
        from the first one where a frame's noise level is 0 (nothing to convert by). 0 when caching
        is off or no chunk is open."""
        c, options = self._chunk, self.options
        if c is None or not options.enabled:
            return 0
        total = steps if steps is not None else (len(c.sigmas) - 1 if c.sigmas is not None else self._steps_seen)
        if total is None:
            return options.reuse_steps if isinstance(options.reuse_steps, int) else UNKNOWN_STEPS_STORED
        limit = options.reuse_steps
        if limit == "auto":  # calibrating (nothing chosen yet): every early step, as the default; then the choice
            limit = self.auto.chosen
        limit = total - 1 if limit is None else min(limit, total - 1)
        if c.sigmas is not None and options.stored == "x0":
            clean = [i for i, level in enumerate(c.sigmas) if _clean(level)]
            limit = min([limit, *clean])
        return limit

    def step(
        self,
        runner: Hashable,
        key: Callable[[], Hashable],
        latents: torch.Tensor,
        compute: Callable[[], torch.Tensor],
        steps: int | None = None,
        step: int | None = None,
        timestep: object = None,
    ) -> torch.Tensor:
        """One model call of ``runner``: the stored output of the matched past chunk on an early step
        of a revisit, else ``compute()`` (stored on early steps).

        ``latents``: the model's noisy latent input; the output has its shape and dtype.
        ``key()``: the cache key of this call (``Accelerator.cache_key``; evaluated only on early
        steps, where a lookup or a store needs it). ``step``: the denoising
        step, if the caller knows it (else the step told by ``set_step``, else the n-th call of
        ``runner`` in this chunk is step n); ``steps``: the chunk's step count, if known (the last
        step is never served). ``timestep``: the call's timestep argument (a number or tensor), if
        the caller knows it: in a chunk without ``sigmas``, whose stamp holds no schedule, an output
        is served only to a call at the timestep it was computed at (a host read of it, each early
        step), and the rest of the chunk computes once one is not. Calls of one step are counted
        per stamp (guidance as separate calls: each call's conditioning has its own entry).
        """
        c = self._chunk
        if c is None or torch.is_grad_enabled() or self._outer:  # inference only: a served output has no gradient
            return compute()
        told = step is None and c.step is not None
        if told:
            step = c.step
            c.calls[runner, step] = c.calls.get((runner, step), 0) + 1
        elif step is None:
            step = c.calls.get(runner, 0)
            c.calls[runner] = step + 1
        limit = self.reuse_limit(steps)
        if step >= limit:
            c.computed += 1
            return compute()
        sigma = self._noise_level(step, latents) if c.sigmas is not None and self.options.stored == "x0" else None
        schedule = tuple(c.sigmas) if c.sigmas is not None else (steps,)
        stamp = Stamp.of(key(), latents, "raw" if sigma is None else "x0", schedule)
        call = 0
        if told:
            call = c.stamp_calls.get((runner, step, stamp), 0)
            c.stamp_calls[runner, step, stamp] = call + 1
        timestep = timestep_values(timestep) if c.sigmas is None else None
        if stamp not in c.matches:
            c.matches[stamp], c.served[stamp] = self._lookup(c, stamp, limit, latents, ((step, call), timestep))
        entry = c.matches[stamp] if step < c.served[stamp] else None
        if entry is not None and (step, call) in entry.outputs and not entry.computed_at((step, call), timestep):
            c.served[stamp] = step  # computed at another timestep (another schedule): compute from here on
            entry = None
        if entry is not None and (step, call) in entry.outputs and self.auto is not None and self.auto.chosen is None:
            out = compute()  # calibration: compute, and measure what serving would have given
            c.computed += 1
            fresh = out if sigma is None else (latents - sigma * out).to(out.dtype)
            c.measured[step] = min(c.measured.get(step, PSNR_CAP_DB), _psnr_db(entry.outputs[step, call], fresh))
            return out
        if entry is not None and (step, call) in entry.outputs:
            c.reused += 1
            c.last_served = max(c.last_served, step)
            stored = entry.outputs[step, call]
            return stored.clone() if sigma is None else ((latents - stored) / sigma).to(latents.dtype)
        out = compute()
        c.computed += 1
        if c.matches[stamp] is None:  # a miss: its early outputs are kept (a near hit's are not)
            if out.shape != latents.shape or out.dtype != latents.dtype:
                raise ValueError(f"the cache serves outputs shaped like the noisy latent {tuple(latents.shape)} "
                                 f"{latents.dtype}, and this call returned {tuple(out.shape)} {out.dtype}: give the "
                                 "argument that is the noisy latent alone (e.g. before it is concatenated with "
                                 "conditioning channels)")
            stored = out if sigma is None else (latents - sigma * out).to(out.dtype)
            if stamp not in c.opened:
                c.opened[stamp] = self.cache.open_entry(c.poses, stamp, c.chunk)
            self.cache.store(c.opened[stamp], step, stored, call, timestep)
            c.finite.setdefault(stamp, []).append(torch.isfinite(stored).all())  # read in end_chunk: no sync here
        return out

    def _lookup(self, c: "_Chunk", stamp: Stamp, limit: int, latents: torch.Tensor,
                timestep: tuple[tuple[int, int], tuple[float, ...] | None]) -> tuple[Entry | None, int]:
        """The open chunk's match under ``stamp`` and how many early steps it serves: ``limit`` on a
        revisit, ``near_reuse_steps`` (at most ``limit``) on a near revisit; ``timestep``: the
        looking-up call's ``(step, call)`` and timestep, which the match's output there must share.
        While ``reuse_steps="auto"`` calibrates, only revisits count (a near one would skew what it
        measures)."""
        self._drop_non_finite()
        options = self.options
        calibrating = self.auto is not None and self.auto.chosen is None
        near = options.near_threshold if options.near_reuse_steps > 0 and not calibrating else None
        entry = self.cache.lookup(c.poses, stamp, limit, options.revisit_threshold,
                                  frame_axis=frame_axis(latents.shape, c.poses.shape[0]), serve=options.serve,
                                  near_threshold=near, previous=self._previous, timestep=timestep)
        if entry is None or entry.score >= options.revisit_threshold:
            return entry, limit
        return entry, min(options.near_reuse_steps, limit)

    def _drop_non_finite(self) -> None:
        """Drop every closed chunk's entry that stored a non-finite output (never keep what a bad
        input produced). Reads each device flag: waits only until the step that stored it has run."""
        for entry, finite in self._unchecked:
            if not bool(finite):
                self.cache.discard(entry)
        self._unchecked.clear()

    def _noise_level(self, step: int, latents: torch.Tensor) -> float | torch.Tensor:
        """The open chunk's noise level at ``step``: a float, or per frame a float32 tensor shaped to
        broadcast along ``latents``' frame axis (made once per chunk and step). ``ValueError`` for a
        level <= 0 (nothing to divide by) or per-frame levels with no single frame axis to put them on."""
        c = self._chunk
        level = c.sigmas[step]
        if _clean(level):
            raise ValueError(f"sigmas[{step}] = {level}: an early step reused from the cache needs noise levels > 0")
        if not isinstance(level, tuple):
            return level
        if step not in c.levels:
            axis = frame_axis(latents.shape, len(level))
            if axis is None:
                raise ValueError(f"per-frame sigmas ({len(level)} frames) need a latent with exactly one axis of "
                                 f"{len(level)} entries after the batch to apply them to, got {tuple(latents.shape)}")
            shape = [1] * latents.dim()
            shape[axis] = len(level)
            c.levels[step] = torch.tensor(level, dtype=torch.float32).view(shape).to(latents.device)
        return c.levels[step]


def _psnr_db(served: torch.Tensor, fresh: torch.Tensor) -> float:
    """PSNR (dB, capped) of ``served`` against ``fresh``, peak ``fresh``'s largest magnitude."""
    mse = float((served.float() - fresh.float()).pow(2).mean())
    peak = float(fresh.float().abs().max())
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(max(peak, 1e-12) ** 2 / mse))


def frame_axis(shape: Sequence[int], frames: int) -> int | None:
    """The latent's frame axis: the one axis after the batch with ``frames`` entries, or None when
    there is none or more than one (then revisits are matched chunk by chunk, frames in order). The
    last axis of a 3-D latent is its channels (tokens ``(B, F * T, C)``), never its frames."""
    last = len(shape) - 1 if len(shape) == 3 else len(shape)
    axes = [a for a in range(1, last) if shape[a] == frames]
    return axes[0] if len(axes) == 1 else None


def _clean(level: Level) -> bool:
    """Whether a step's noise level (or one of its frames', per frame) is 0: nothing to convert by."""
    return min(level if isinstance(level, tuple) else (level,)) <= 0


def timestep_values(timestep: object) -> tuple[float, ...] | None:
    """A model call's timestep argument as host numbers (a tensor's are read: a sync on the GPU), or
    None for anything else (not known)."""
    if isinstance(timestep, torch.Tensor):
        return tuple(timestep.detach().flatten().double().tolist())
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return (float(timestep),)
    return None


def check_sigmas(sigmas: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor, frames: int) -> list[Level]:
    """``sigmas (steps + 1,)`` as floats, or per-frame ``(steps + 1, frames)`` as one tuple of floats
    per step, from a list or tuple (of numbers or 0-d tensors, or of rows), a tensor or a numpy array;
    ``ValueError`` unless there are at least two steps' levels, all finite and >= 0, and per-frame rows
    have one level for each of the chunk's ``frames``."""
    def number(level: object) -> float:
        level = level.item() if isinstance(level, torch.Tensor) and level.dim() == 0 else level
        if isinstance(level, bool) or not isinstance(level, (int, float)) and type(level).__module__ != "numpy":
            raise ValueError(f"sigmas must be numbers, got {level!r} in {sigmas!r}")
        return float(level)

    if not isinstance(sigmas, (list, tuple)) and not (hasattr(sigmas, "tolist") and getattr(sigmas, "ndim", 0) >= 1):
        raise ValueError(f"sigmas must be a list, tuple, tensor or array of steps + 1 noise levels (or of per-frame "
                         f"rows), got {sigmas!r}")
    rows = sigmas.tolist() if not isinstance(sigmas, (list, tuple)) else [
        r.tolist() if hasattr(r, "tolist") and getattr(r, "ndim", 0) >= 1 else r for r in sigmas]
    per_frame = bool(rows) and isinstance(rows[0], (list, tuple))
    if any(isinstance(r, (list, tuple)) != per_frame for r in rows):
        raise ValueError(f"sigmas must be all numbers or all per-frame rows, got {sigmas!r}")
    if per_frame:
        schedule = [tuple(number(s) for s in r) for r in rows]
        if any(len(r) != frames for r in schedule):
            raise ValueError(f"per-frame sigmas must be (steps + 1, {frames}) for a chunk of {frames} frames, "
                             f"got rows of {sorted({len(r) for r in schedule})} levels")
        levels = [s for r in schedule for s in r]
    else:
        schedule = [number(s) for s in rows]
        levels = schedule
    if len(schedule) < 2:
        raise ValueError(f"sigmas must list steps + 1 >= 2 noise levels, got {schedule}")
    if any(not math.isfinite(s) or s < 0 for s in levels):
        raise ValueError(f"sigmas must be finite and >= 0, got {schedule}")
    return schedule
