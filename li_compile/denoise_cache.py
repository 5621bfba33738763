"""The denoising cache: per-step model outputs of past chunks, reused on revisits.

When the camera comes back to a place it has generated before, the early denoising steps of the
new chunk mostly decide coarse layout, which the first visit already decided. The cache keeps, for
each generated chunk, the model's outputs at its early steps, keyed by the chunk's cameras and
stamped with everything that makes outputs comparable (the cache key: weights generation and
conditioning digest, ``li_compile.cache_key``; the sigma schedule; latent shape, dtype, device;
what was stored). A lookup only returns an entry with the identical stamp, so a hit never crosses
weights, conditioning, schedules, resolutions, dtypes or devices. Each accelerated model has its
own cache, so it never crosses models either. Capacity is bounded (entries, and bytes if asked),
least recently used first out; the bytes held are accounted.

Which past frames are "the same place": with the latent's frame axis known (``frame_axis``), each
frame of the chunk ``(F, 4, 4)`` is matched on its own, to the best-scoring frame of any past chunk
under the same stamp, in any order (``frame_revisit_scores``: ``li_compile.controller.similarity``,
cameras farther apart than the revisit distance do not count); a hit needs every frame matched, and
the served output is assembled frame by frame from the matched frames' outputs. So a retraced path
(walk out, come back) and a crossing path revisit too. Without a frame axis (none, or ambiguous),
every camera must match the same frame of one past chunk (``chunk_revisit_scores``). A lookup may
also accept a *near* revisit: every frame matched at a lower ``near_threshold``, not all at the
revisit threshold, unless every frame matches the last camera of the chunk just before at least as
well as what would serve it (the path going on from there, ``continues_path``). The entry it
returns carries its ``score`` (its worst frame's match), so that the caller can serve fewer steps
from a near revisit. A frame never matches a past frame it shares nothing with (score 0), whatever
the thresholds.

Per-frame schedules (diffusion forcing: the stamp's schedule holds one tuple of per-frame noise
levels per step) add one rule: a frame matches only past frames whose schedule column equals its
own, so at every served step the past frame was at the noise level this frame is at.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Hashable

import torch

from li_compile.controller.poses import camera_centers
from li_compile.controller.similarity import DEFAULT_FAR, REVISIT_MAX_DISTANCE, similarity

REVISIT_MEASURE = "frustum"  # the reference measure: a revisit decision is rare and worth its cost
PREDICTIONS = ("x0", "raw")
PAIR_BATCH = 256  # (frame, past frame) pairs scored per similarity call: about 13 MB of frustum samples


@dataclass(frozen=True)
class Stamp:
    """What must match for a cached output to be reusable: the cache key (weights generation and
    conditioning digest), the latent shape, dtype and device, what was stored (``"x0"``: the
    clean-latent prediction, ``"raw"``: the model output as returned) and the schedule (the chunk's
    sigmas, or its step count when they are not given)."""

    key: Hashable
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    prediction: str = "raw"
    schedule: tuple = ()

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Stamp.prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")

    @classmethod
    def of(cls, key: Hashable, latents: torch.Tensor, prediction: str = "raw", schedule: tuple = ()) -> "Stamp":
        """The stamp of outputs shaped like ``latents`` made under cache ``key`` and ``schedule``."""
        return cls(key, tuple(latents.shape), latents.dtype, str(latents.device), prediction, schedule)


@dataclass
class Entry:
    """One past chunk: its cameras ``(F, 4, 4)`` (CPU, float32), its stamp, its outputs by
    ``(step, call)`` (``call``: the model call within the step, 0 unless a step calls the model more
    than once, e.g. guidance as separate calls), and the chunk number it was generated as (for
    reports; -1 when not told). ``score``: on a lookup's result, how well the chunk it serves
    matched (at least the revisit threshold on a hit, the worst frame's match on a near hit); 1.0 on
    a stored entry."""

    key: int
    poses: torch.Tensor
    stamp: Stamp
    outputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    chunk: int = -1
    score: float = 1.0
    # the timestep each output was computed at, per (step, call): one value, or an assembled entry's
    # sources' values (None: not known); told where the stamp holds no schedule
    timesteps: dict[tuple[int, int], frozenset] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs.values())

    def computed_at(self, key: tuple[int, int], timestep: tuple[float, ...] | None) -> bool:
        """Whether the output at ``key`` (step, call) was computed at ``timestep`` (each source's, for
        an assembled entry; None: not known, on both sides)."""
        return self.timesteps.get(key, {None}) == {timestep}


@dataclass
class CacheStats:
    """Counters since the cache was made (per-chunk figures are differences of these)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    near_misses: int = 0  # misses where some of the chunk's frames matched (a partial revisit, computed in full)
    near_hits: int = 0  # every frame matched at the near threshold, not all at the revisit one (not in hits)


def chunk_poses(poses: torch.Tensor) -> torch.Tensor:
    """``poses`` of one chunk as the cache keeps them: ``(F, 4, 4)`` (a single ``(4, 4)`` becomes
    ``(1, 4, 4)``), float32 on the CPU. Raises ``ValueError`` on any other shape."""
    if poses.shape == (4, 4):
        poses = poses[None]
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or poses.shape[0] == 0:
        raise ValueError(f"chunk poses must be (F, 4, 4) camera-to-world matrices, got {tuple(poses.shape)}")
    return poses.detach().to("cpu", torch.float32).clone()


def frame_revisit_scores(
    current: torch.Tensor,
    bank: torch.Tensor,
    measure: str = REVISIT_MEASURE,
    max_distance: float = REVISIT_MAX_DISTANCE,
    far: float = DEFAULT_FAR,
) -> torch.Tensor:
    """How well each past frame matches each current one: ``(F, 4, 4)``, ``(M, 4, 4)`` -> ``(F, M)``.

    ``similarity`` of each pair, 0 where the camera centres are farther apart than
    ``max_distance * far`` (only the others are scored, ``PAIR_BATCH`` pairs per call: the frustum
    measure holds ``4096 x 3`` sample coordinates per pair)."""
    distance = (camera_centers(bank)[None] - camera_centers(current)[:, None]).norm(dim=-1)  # (F, M)
    scores = torch.zeros(current.shape[0], bank.shape[0])
    near = (distance <= max_distance * far).nonzero()
    for frames, past in (pairs.unbind(-1) for pairs in near.split(PAIR_BATCH)):
        scores[frames, past] = similarity(current[frames], bank[past], measure, far=far)
    return scores


def chunk_revisit_scores(
    current: torch.Tensor,
    bank: torch.Tensor,
    measure: str = REVISIT_MEASURE,
    max_distance: float = REVISIT_MAX_DISTANCE,
    far: float = DEFAULT_FAR,
) -> torch.Tensor:
    """How well each past chunk matches the current one: ``(F, 4, 4)``, ``(N, F, 4, 4)`` -> ``(N,)``.

    The score of a past chunk is the lowest, over frames ``f``, of ``frame_revisit_scores`` between
    ``current[f]`` and ``bank[:, f]``: 0 when any camera centre is farther than ``max_distance * far``
    from its counterpart (parallax of near content would differ, as in ``find_revisit``)."""
    if bank.ndim != 4 or bank.shape[1:] != current.shape:
        raise ValueError(f"bank must be (N, {', '.join(map(str, current.shape))}), got {tuple(bank.shape)}")
    chunks, frames = bank.shape[:2]
    pairs = frame_revisit_scores(current, bank.reshape(chunks * frames, 4, 4), measure, max_distance, far)
    same_frame = pairs.reshape(frames, chunks, frames).diagonal(dim1=0, dim2=2)  # (N, F): frame f against frame f
    return same_frame.min(-1).values


class DenoiseCache:
    """Bounded LRU store of per-step model outputs of past chunks.

    ``capacity``: most entries kept; ``max_bytes``: most bytes of stored outputs (None: no byte bound).
    """

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"DenoiseCache capacity must be >= 1, got {capacity}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"DenoiseCache max_bytes must be >= 0 or None, got {max_bytes}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_key = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: Entry) -> bool:
        return self._entries.get(entry.key) is entry

    def entries(self) -> list[Entry]:
        """The entries held, least recently used first."""
        return list(self._entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by stored outputs."""
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()

    def open_entry(self, poses: torch.Tensor, stamp: Stamp, chunk: int = -1) -> Entry:
        """Start the entry of chunk number ``chunk`` (``poses``: its cameras, see ``chunk_poses``);
        its outputs are added with ``store``. May evict the least recently used entry."""
        entry = Entry(self._next_key, chunk_poses(poses), stamp, chunk=chunk)
        self._next_key += 1
        self._entries[entry.key] = entry
        self._evict(keep=entry.key)
        return entry

    def discard(self, entry: Entry) -> None:
        """Drop ``entry`` (if still held)."""
        if entry in self:
            del self._entries[entry.key]

    def store(self, entry: Entry, step: int, output: torch.Tensor, call: int = 0,
              timestep: tuple[float, ...] | None = None) -> None:
        """Keep ``output`` (a copy) as ``entry``'s stored output of model ``call`` at denoising ``step``
        (computed at ``timestep``, if told). Does nothing if the entry was evicted meanwhile; may evict
        other entries to stay within ``max_bytes``."""
        if tuple(output.shape) != entry.stamp.shape or output.dtype != entry.stamp.dtype:
            raise ValueError(
                f"cached output must match the entry's stamp {entry.stamp.shape}/{entry.stamp.dtype}, "
                f"got {tuple(output.shape)}/{output.dtype}"
            )
        if entry in self:
            entry.outputs[step, call] = output.detach().clone()
            entry.timesteps[step, call] = frozenset({timestep})
            self._evict(keep=entry.key)

    def lookup(
        self,
        poses: torch.Tensor,
        stamp: Stamp,
        steps: int,
        threshold: float,
        measure: str = REVISIT_MEASURE,
        max_distance: float = REVISIT_MAX_DISTANCE,
        frame_axis: int | None = None,
        serve: str = "best",
        near_threshold: float | None = None,
        previous: torch.Tensor | None = None,
        timestep: tuple[tuple[int, int], tuple[float, ...] | None] | None = None,
    ) -> Entry | None:
        """The revisit served to a chunk at ``poses``: among entries with the identical ``stamp`` and
        outputs for steps ``0 .. steps - 1``, per frame the best-matching past frame (``frame_axis``
        given: an ``Entry`` assembled from them, not stored) or the best-matching whole past chunk
        (``chunk_revisit_scores``), each scoring at least ``threshold``, or (a near hit) at least
        ``near_threshold`` (at most ``threshold``; None: no near hits). A near hit's ``score`` is its
        worst frame's match, below ``threshold``; a hit's is at least ``threshold``. Counts a hit, a
        near hit or a miss and marks the entries used most recently used. Ties go to the oldest
        entry. ``serve`` (per frame, ``options.CACHE_SERVE``): ``"best"`` the best match's output,
        ``"blend"`` the average of every past frame matching at the threshold accepted, weighted by
        its score (a hit blends only frames matching at ``threshold``). ``previous``: the last camera
        ``(4, 4)`` of the chunk generated just before (whether stored or not); given, a near match
        that ``continues_path`` from it is a miss: the path goes on from there rather than coming
        back. ``timestep``: ``((step, call), value)``, only entries whose output there was computed at
        that timestep (``Entry.timesteps``) are candidates."""
        if near_threshold is not None and not 0.0 <= near_threshold <= threshold:
            raise ValueError(f"near_threshold must be in [0, threshold={threshold}], got {near_threshold}")
        accept = threshold if near_threshold is None else near_threshold
        current = chunk_poses(poses)
        candidates = [
            e for e in self._entries.values()
            if e.stamp == stamp and all((s, 0) in e.outputs for s in range(steps))
            and (timestep is None or e.computed_at(*timestep))
        ]
        if frame_axis is not None:
            match = self._frame_match(current, candidates, frame_axis, accept, measure, max_distance, serve,
                                      previous=previous, revisit=threshold)
            return self._count(match, threshold)
        candidates = [e for e in candidates if e.poses.shape == current.shape]
        best = None
        if candidates:
            scores = chunk_revisit_scores(current, torch.stack([e.poses for e in candidates]), measure, max_distance)
            index = int(scores.argmax())
            score = float(scores[index])
            if score > 0 and score >= threshold:
                best = candidates[index]
            elif score > 0 and score >= accept:  # a near hit: a copy that says how near (the stored entry keeps 1.0)
                per_frame = frame_revisit_scores(current, candidates[index].poses, measure, max_distance).diagonal()
                if continues_path(current, per_frame, previous, measure, max_distance):
                    self.stats.near_misses += 1
                else:
                    best = replace(candidates[index], score=score)
        if best is not None:
            self._entries.move_to_end(best.key)
        return self._count(best, threshold)

    def _count(self, match: Entry | None, threshold: float) -> Entry | None:
        if match is None:
            self.stats.misses += 1
        elif match.score >= threshold:
            self.stats.hits += 1
        else:
            self.stats.near_hits += 1
        return match

    def _frame_match(self, current: torch.Tensor, candidates: list[Entry], frame_axis: int, threshold: float,
                     measure: str, max_distance: float, serve: str, previous: torch.Tensor | None = None,
                     revisit: float = 1.0) -> Entry | None:
        """Every current frame's matching past frames (any entry, any order), or None if a frame has
        none scoring at least ``threshold`` (and above 0), or if the match scores below ``revisit`` and
        ``continues_path`` from the camera ``previous``: their outputs (the best one, or the
        score-weighted blend of all matching at the threshold the match met) assembled along
        ``frame_axis`` into an unstored ``Entry``."""
        if not candidates:
            return None
        owners = [(e, g) for e in candidates for g in range(e.poses.shape[0])]
        scores = frame_revisit_scores(current, torch.cat([e.poses for e in candidates]), measure, max_distance)
        levels = frame_schedules(candidates[0].stamp)
        if levels is not None:  # diffusion forcing: only frames on the same noise schedule stand in for each other
            scores = scores * torch.tensor([[levels[f] == levels[g] for _, g in owners] for f in range(len(current))])
        best_score, best = scores.max(-1)  # first (oldest) on ties
        matched = (best_score >= threshold) & (best_score > 0)
        if not bool(matched.all()):
            self.stats.near_misses += int(bool(matched.any()))
            return None
        best, worst = best.tolist(), float(best_score.min())
        if worst < revisit and continues_path(current, best_score, previous, measure, max_distance):
            self.stats.near_misses += 1
            return None
        if serve == "best":
            weights = [[(m, 1.0)] for m in best]
        elif serve == "blend":
            floor = revisit if worst >= revisit else threshold
            weights = [[(m, float(w)) for m, w in enumerate(row.tolist()) if w >= floor and w > 0] for row in scores]
        else:
            raise ValueError(f"serve must be 'best' or 'blend', got {serve!r}")
        sources = [owners[m] for frame in weights for m, _ in frame]
        keys = set.intersection(*(set(e.outputs) for e, _ in sources))
        outputs = {key: torch.cat([_blend(owners, frame, key, frame_axis) for frame in weights], frame_axis)
                   for key in keys}
        chunks = [owners[m][0].chunk for m in best]
        used = {id(e): e for e, _ in sources}.values()
        for entry in used:
            self._entries.move_to_end(entry.key)
        timesteps = {key: frozenset().union(*(e.timesteps.get(key, {None}) for e in used)) for key in keys}
        return Entry(-1, current, candidates[0].stamp, outputs, chunk=max(chunks, key=chunks.count), score=worst,
                     timesteps=timesteps)

    def _evict(self, keep: int) -> None:
        """Drop least recently used entries (never ``keep``) until within capacity and ``max_bytes``."""
        while len(self._entries) > 1 and (
            len(self._entries) > self.capacity or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            oldest = next(k for k in self._entries if k != keep)
            del self._entries[oldest]
            self.stats.evictions += 1


CONTINUATION_SLACK = 1e-6  # scores of one pair computed in two calls may differ by rounding


def continues_path(current: torch.Tensor, served: torch.Tensor, previous: torch.Tensor | None,
                   measure: str = REVISIT_MEASURE, max_distance: float = REVISIT_MAX_DISTANCE) -> bool:
    """Whether a match only continues the path: every current frame ``(F, 4, 4)`` matches the
    camera ``previous`` ``(4, 4)`` (the last of the chunk generated just before) at least as well as
    the past frame serving it matches it (``served``: ``(F,)`` scores). The path then goes on from
    where that chunk ended (``explore``'s chunks of 2 frames score 0.93 and 0.86 against it) rather
    than coming back; a return matches other places better. False without ``previous``."""
    if previous is None:
        return False
    against = frame_revisit_scores(current, previous.reshape(1, 4, 4).float(), measure, max_distance)[:, 0]
    return bool((against >= served.float() - CONTINUATION_SLACK).all())


def frame_schedules(stamp: Stamp) -> list[tuple[float, ...]] | None:
    """Each frame's noise levels over the steps (a column of a per-frame schedule), or None when the
    stamp's schedule is one level per step (or a step count)."""
    rows = stamp.schedule
    if not rows or not all(isinstance(r, tuple) for r in rows):
        return None
    return list(zip(*rows))


def _blend(owners: list[tuple[Entry, int]], frame: list[tuple[int, float]], key: tuple[int, int],
           frame_axis: int) -> torch.Tensor:
    """One served frame: the outputs at ``key`` of the past frames ``frame`` lists (``(index into
    owners, weight)``), averaged with those weights (one source: its output, unchanged)."""
    parts = [owners[m][0].outputs[key].narrow(frame_axis, owners[m][1], 1) for m, _ in frame]
    if len(parts) == 1:
        return parts[0]
    total = sum(w for _, w in frame)
    return sum(p.float() * (w / total) for p, (_, w) in zip(parts, frame)).to(parts[0].dtype)
