"""The context controller: per chunk, which past frames a world model attends to, and the plan for it.

``ContextController.select`` implements the context-policy protocol of the reference generation loop
(``li_compile.worlds.pipeline``; same call as its ``DensePolicy``)::

    selection = controller.select(chunk, poses, chunk_poses, latents)
    #   poses       (N, 4, 4)   camera-to-world of every past latent frame
    #   chunk_poses (F, 4, 4)   cameras of the frames about to be generated
    #   latents     (N, ...)     the past generated latent frames, one per pose (any layout after N)
    #   -> ContextSelection(memory=[...], recent=[...], capacity=...)

Per chunk it
1. sizes the temporal window (``recent``: the last ``w`` frames) from the local latent dynamics with
   the configured rule (``window.py``; ``options.window_rule``, ``window_min``..``window_max``);
2. scores every older frame against the chunk's cameras (``similarity.py``, the best score over the
   chunk's frames) and keeps the ``memory_k`` best of those scoring ``>= keep_threshold``: novel
   exploration drops stale memory instead of feeding the model frames that show something else;
3. picks the context capacity: the smallest capacity bucket (``buckets.py``) holding the kept frames,
   which the pipeline pads to (compact context: dropped frames cost no compute, one compile per bucket);
   when the padding would leave the plan denser than ``fill_density``, it fills the padding with the
   next-best memory frames instead (dense attention beats the kernel on such plans);
4. writes the attention plan for that capacity in place (``attention_plan.py``) and records the
   decisions as a ``ChunkStats`` in ``controller.stats``.

With ``options.enabled = False`` it is the dense policy: a ``window_max`` window, the ``memory_k`` most
similar older frames whatever their score, and the full capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from li_compile.controller.attention_plan import (
    check_calibrated_heads, flash_span, kernel_density, padded_context_keep, tile_shape, visited_share,
    write_chunk_plan, write_tile_chunk_plan,
)
from li_compile.controller.buckets import CAPACITY_FRACTIONS, bucket_for, capacity_buckets
from li_compile.controller.calibration import Calibration, CalibrationSetting
from li_compile.controller.poses import bounds_from_fov, validate_bounds, validate_poses
from li_compile.controller.similarity import DEFAULT_FAR, DEFAULT_NEAR, similarity
from li_compile.controller.selection import ContextSelection
from li_compile.controller.tile_plan import TilePlanParams, mandatory_blocks
from li_compile.controller.window import latent_dynamics, validate_latents, window_size
from li_compile.options import ContextOptions, SparsityOptions
from li_compile.passes.guards import take_fallbacks
from li_compile.plan import Plan
from li_compile.reporting import ChunkStats
from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence

if TYPE_CHECKING:
    from li_compile.calibrating import CalibrationRun

DEFAULT_MEMORY_K = 4  # memory frames retrieved per chunk at most (the dense policy's fixed k)


def _one_number(name: str, value: object) -> torch.Tensor:
    """``value`` (a number, or a one-element tensor or array) as a 0-d float tensor; ValueError naming
    ``name`` otherwise (a batch of lenses, a bool, None)."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    if tensor is None or tensor.dtype == torch.bool or tensor.is_complex() or tensor.numel() != 1:
        raise ValueError(f"{name} must be one number (one lens for every camera), got {value!r}")
    return tensor.reshape(()).float()


class ContextController:
    """Adaptive context for chunk-by-chunk world generation (see the module docstring).

    ``options``: the model's ``ContextOptions`` (the ``context`` part of its compile options);
    ``plan``: the model's plan slots, which ``select`` writes; ``memory_k``: the most memory frames fed per chunk; the lens as ``bounds (4,)`` or
    ``fov_y_deg`` (+ ``aspect``), and the depth range ``near``/``far`` (scene scale) for similarity;
    ``capacity_fractions``: the capacity buckets as fractions of ``memory_k + window_max``;
    ``layout``: the model's attention token layout for a given context capacity (e.g. a reference
    world's ``world.layout``); without it no attention plan is written (context selection only).
    """

    def __init__(
        self,
        options: ContextOptions,
        plan: Plan,
        *,
        sparsity: SparsityOptions = SparsityOptions(),
        memory_k: int = DEFAULT_MEMORY_K,
        bounds: torch.Tensor | None = None,
        fov_y_deg: float | None = None,
        aspect: float = 1.0,
        near: float = DEFAULT_NEAR,
        far: float = DEFAULT_FAR,
        capacity_fractions: tuple[float, ...] = CAPACITY_FRACTIONS,
        layout: Callable[[int], SequenceLayout] | None = None,
    ) -> None:
        if not isinstance(options, ContextOptions):
            raise ValueError(f"options must be ContextOptions, got {type(options).__name__}")
        self.options, self.plan, self.sparsity = options, plan, sparsity
        if isinstance(memory_k, bool) or not isinstance(memory_k, int) or memory_k < 0:
            raise ValueError(f"memory_k must be an int >= 0, got {memory_k!r}")
        if bounds is not None and fov_y_deg is not None:
            raise ValueError("give the lens as bounds or as fov_y_deg, not both")
        if fov_y_deg is not None:
            bounds = bounds_from_fov(_one_number("fov_y_deg", fov_y_deg), _one_number("aspect", aspect))
        self.bounds = None if bounds is None else validate_bounds(bounds)
        if self.bounds is not None and self.bounds.shape != (4,):
            raise ValueError(f"bounds must be (4,) (x_min, x_max, y_min, y_max: one lens for every camera), "
                             f"got shape {tuple(self.bounds.shape)}")
        if not 0 < near < far:
            raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
        self.near, self.far = near, far
        self.tile_params = TilePlanParams(
            recent_radius=sparsity.recent_radius, depth_range=(near, far), visibility_margin=sparsity.visibility_margin,
            context_queries=sparsity.context_queries,
        )
        self.head_params: tuple[TilePlanParams | None, ...] | None = None  # calibrated plans (use_calibration)
        self.calibrating: CalibrationRun | None = None  # set by Accelerator.calibrate: measure, run dense
        self.memory_k = memory_k
        self.max_context = memory_k + self.options.window_max
        self.buckets = capacity_buckets(self.max_context, capacity_fractions)
        self.layout = layout
        if layout is not None:
            check_layout_function(layout, self.buckets)
        self.stats: list[ChunkStats] = []
        self._tiled: dict[int, TiledSequence] = {}  # capacity -> its tile order (permutations built once)
        self._floors: dict[tuple[int, TilePlanParams], float] = {}  # least tile-plan density (cameras aside)

    def calibration_setting(self) -> CalibrationSetting:
        """The setting a calibration of this controller's plans is measured in and must match: the
        options' block sizes, the tile of one block (``tile_shape``), the depth range (near, far) and
        the lens (``bounds``; there is one wherever tile plans are written)."""
        sparsity = self.sparsity
        return CalibrationSetting(sparsity.block_q, sparsity.block_k, tile_shape(sparsity.block_q), (self.near, self.far),
                                  tuple(self.bounds.tolist()))

    def calibration_refusal(self) -> str | None:
        """Why this model never writes camera tile plans, so that per-head plans (a calibration) cannot
        act, or None (``_frame_plan_reason``). Plans too dense to pay (their floor above
        ``sparsity.max_density``) are no reason: they run dense where they are, which the chunk
        statistics say, as uncalibrated plans do."""
        if self.layout is None:
            return "no attention layout is configured (configure(layout=...))"
        return self._frame_plan_reason(self.warm_up_buckets()[-1], floor=False)

    def use_calibration(self, calibration: Calibration | None) -> None:
        """Plan every later chunk with one tile plan per head from ``calibration`` (None: the options'
        single plan). Raises ValueError naming why when it cannot act: no chunk gets a tile plan
        (``calibration_refusal``), it was measured in another setting (``Calibration.made_for`` against
        ``calibration_setting``), or for another head count than the compiled attention sites have
        (sites compiled later are checked when their plan is written)."""
        if calibration is None:
            self.head_params = None
            return
        refusal = self.calibration_refusal()
        if refusal is not None:
            raise ValueError(f"this calibration cannot act: no chunk gets a per-head tile plan, as {refusal}")
        ours = self.calibration_setting()
        if calibration.made_for is not None and calibration.made_for != ours:
            raise ValueError(
                "this calibration was measured in another setting (calibration vs this model): "
                f"{'; '.join(calibration.made_for.differences(ours))}; calibrate this model"
            )
        for sequence in map(self.layout, self.warm_up_buckets()):  # (a layout is configured: no refusal)
            check_calibrated_heads(calibration.heads, self.plan.slots_for(q_len=sequence.q_len, kv_len=sequence.kv_len))
        self.head_params = calibration.head_params()

    def warm_up_buckets(self) -> tuple[int, ...]:
        """The context capacities ``select`` may return, ascending: run one chunk at each during
        warm-up so the model compiles every bucket then (once each) and never afterwards."""
        return self.buckets if self.options.enabled else (self.max_context,)

    def video_shapes(self) -> set[tuple[int, int]] | None:
        """The ``(q_len, kv_len)`` of the video layout at every capacity this controller may pick: the
        attention shapes its plans are written for (None: no layout configured)."""
        if self.layout is None:
            return None
        return {(s.q_len, s.kv_len) for s in map(self.layout, self.warm_up_buckets())}

    def warm_up_plan(self, capacity: int) -> bool:
        """Write the plan of a chunk whose ``capacity`` context slots are all padding (the warm-up
        call's context), through the path a real chunk's plan takes (a camera tile plan with the
        chunk's span split off, or a frame plan), so that a warm-up call at that capacity launches
        the block-sparse kernel in the shapes the chunks will: it compiles and autotunes then, never
        while a trajectory is timed. The attention sites get their plan slots when the model first
        compiles at ``capacity``: ``warm_up`` calls this as each is created. Returns whether a sparse
        plan was written (False: no site at that capacity yet, or nothing to sparsify)."""
        if self.layout is None or not self.options.enabled:
            return False
        chunk_poses = torch.eye(4).expand(self.layout(capacity).chunk_frames, 4, 4)
        return self._write_plan(capacity, [], [], torch.eye(4)[:0], chunk_poses)["plan"] == "sparse"

    def warm_up(self, call: Callable[[int], object], repeat: Callable[[], bool] | None = None) -> None:
        """Compile every capacity bucket and run both attention routes at each, before anything is
        timed, in one call per bucket. ``call(capacity)`` runs the model once on a context of
        ``capacity`` slots (all padding is fine). The all-padding sparse plan of ``warm_up_plan`` is
        written into each site's plan slot as the call compiles it (``Plan.warming_up``), so the same
        call launches the block-sparse kernel (it compiles and autotunes at that shape) and, once per
        site, the dense SDPA route a denser chunk would take. ``repeat()`` true after that call: call
        once more with the plan still written (CUDA graphs record on a function's second call). The
        plans are cleared afterwards."""
        try:
            for capacity in self.warm_up_buckets():
                self.warm_up_plan(capacity)  # sites compiled at this capacity before (a second warm-up)
                with self.plan.warming_up(lambda slot, at=capacity: self.warm_up_plan(at)):
                    call(capacity)
                if repeat is not None and repeat():
                    call(capacity)
        finally:
            self.plan.clear()

    def select(
        self, chunk: int, poses: torch.Tensor, chunk_poses: torch.Tensor, latents: torch.Tensor
    ) -> ContextSelection:
        """The context for ``chunk``: memory and recent frame indices into the past frames, and the
        capacity to pad them to. Shapes in the module docstring; raises ``ValueError`` naming bad input."""
        poses, chunk_poses = self._check(chunk, poses, chunk_poses, latents)
        past = poses.shape[0]
        window, dynamics = self._window(latents)
        recent = list(range(max(0, past - window), past))
        candidates = recent[0] if recent else past
        scores = self._scores(poses[:candidates], chunk_poses)
        retrieved = self._memory(scores)
        capacity = self._capacity(len(retrieved) + len(recent))
        memory = self._fill(retrieved, scores, capacity, len(recent))
        self.flush_fallbacks()
        values = {
            "window": len(recent),
            "dynamics": dynamics,
            "memory_candidates": candidates,
            "memory_kept": len(memory),
            "memory_dropped": min(candidates, self.memory_k) - len(memory),
            "memory_filled": len(memory) - len(retrieved),
            "capacity": capacity,
        }
        if self.layout is not None:
            values.update(self._write_plan(capacity, memory, recent, poses, chunk_poses))
        self.stats.append(ChunkStats(chunk, values))
        return ContextSelection(memory=memory, recent=recent, capacity=capacity)

    def _write_plan(self, capacity: int, memory: list[int], recent: list[int], poses: torch.Tensor,
                    chunk_poses: torch.Tensor) -> dict[str, object]:
        """The chunk's attention plan at ``capacity``: the camera tile plan (``sparsity.plan="tiles"``
        with the lens known), else the frame plan (dropped slots skipped; dense when the controller is
        off, as every slot is then kept)."""
        sequence = self.layout(capacity)
        kept = len(memory) + len(recent) if self.options.enabled else capacity  # off: every slot kept, dense
        if self._frame_plan_reason(capacity) is not None:  # skip a tile plan's host work
            return write_chunk_plan(self.plan, sequence, padded_context_keep(kept, capacity))
        roles = ["pad"] * (capacity - kept) + ["memory"] * len(memory) + ["recent"] * len(recent)
        context_poses = torch.eye(4).repeat(capacity, 1, 1)
        if kept:
            context_poses[capacity - kept:] = poses[memory + recent]
        if self.calibrating is not None:
            return self.calibrating.write_candidates(self.plan, self._tiled_at(capacity), roles, context_poses,
                                                     chunk_poses, self.bounds, self.calibration_setting())
        return write_tile_chunk_plan(self.plan, self._tiled_at(capacity), roles, context_poses, chunk_poses,
                                     self.bounds, self.tile_params, self.sparsity, self.head_params)

    def _frame_plan_reason(self, capacity: int, floor: bool = True) -> str | None:
        """Why a chunk at ``capacity`` gets a frame plan (or none) rather than a camera tile plan, or
        None; ``floor=False`` leaves out the plans' density floor (``_plans_floor``)."""
        sparsity = self.sparsity
        if not sparsity.enabled:
            return "sparsity.enabled is False (no attention site is rewritten)"
        if not self.options.enabled:
            return "the context controller is off (context.enabled=False)"
        if sparsity.plan != "tiles":
            return f"sparsity.plan is {sparsity.plan!r}"
        if self.bounds is None:
            return "no lens is configured (fov_y_deg or bounds)"
        if self.calibrating is not None or not floor:  # candidates are measured whatever the options' plan costs
            return None
        floor = self._plans_floor(capacity)
        if floor > sparsity.max_density:  # e.g. dense context rows
            plans = "the calibrated per-head plans" if self.head_params is not None else "a tile plan"
            return (f"{plans} at context capacity {capacity} would run at least {floor:.3f} of the block pairs "
                    f"in the kernel, above sparsity.max_density={sparsity.max_density}")
        return None

    def _plans_floor(self, capacity: int) -> float:
        """``_floor`` of the plans in effect: the options' plan, or the mean over heads of the calibrated
        per-head plans' (a dense head: 1)."""
        if self.head_params is None:
            return self._floor(capacity, self.tile_params)
        return sum(1.0 if p is None else self._floor(capacity, p) for p in self.head_params) / len(self.head_params)

    def _floor(self, capacity: int, params: TilePlanParams) -> float:
        """The least share of its block pairs the kernel would run (``kernel_density``) in a tile plan
        of ``params`` at ``capacity`` with a full context (own chunk, sinks, its context rows), in the
        blocks of the options; computed once per capacity and plan."""
        if (capacity, params) not in self._floors:
            tiled = self._tiled_at(capacity)
            mandatory = mandatory_blocks(tiled, params, self.sparsity.block_q, self.sparsity.block_k)
            span = flash_span(tiled.sequence, (params,), self.sparsity, self.sparsity.block_k)
            self._floors[capacity, params] = kernel_density(float(mandatory.float().mean()), span, mandatory.shape[-1])
        return self._floors[capacity, params]

    def _tiled_at(self, capacity: int) -> TiledSequence:
        """The sequence at ``capacity`` in the tile order of one block (``sparsity.block_q``), made once."""
        if capacity not in self._tiled:
            self._tiled[capacity] = TiledSequence(self.layout(capacity), tile_shape(self.sparsity.block_q))
        return self._tiled[capacity]

    def flush_fallbacks(self) -> None:
        """File the attention calls that ran dense since the last chunk began (reason -> count,
        from the plan guards) under ``fallbacks`` in the latest chunk's stats. ``select`` does this
        for the previous chunk; call it once after the last chunk."""
        fallbacks = take_fallbacks(self.plan)
        if fallbacks and self.stats:
            self.stats[-1].values["fallbacks"] = fallbacks

    def _check(self, chunk, poses, chunk_poses, latents) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"chunk must be an int >= 0, got {chunk!r}")
        poses = validate_poses(poses, "poses")
        chunk_poses = validate_poses(chunk_poses, "chunk_poses")
        if poses.ndim != 3:
            raise ValueError(f"poses must be (N, 4, 4) for N past frames, got {tuple(poses.shape)}")
        if chunk_poses.ndim != 3 or chunk_poses.shape[0] < 1:
            raise ValueError(f"chunk_poses must be (F, 4, 4) with F >= 1, got {tuple(chunk_poses.shape)}")
        if not isinstance(latents, torch.Tensor) or latents.ndim < 2 or latents.shape[0] != poses.shape[0]:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be (N, ...) with N = {poses.shape[0]} past frames (one latent per pose, "
                             f"any layout after), got {shape}")
        return poses, chunk_poses

    def _window(self, latents: torch.Tensor) -> tuple[int, float | None]:
        """Window length from the dynamics of the last ``window_max`` frames (``window_max`` itself,
        with no dynamics measured, while fewer than two frames exist, under the ``"fixed"`` rule or
        with the controller off)."""
        opts = self.options
        recent = latents[-opts.window_max :]
        if not opts.enabled or opts.window_rule == "fixed" or recent.shape[0] < 2:
            return opts.window_max, None
        validate_latents(recent, first=latents.shape[0] - recent.shape[0])  # a bad frame by its index in the history
        dynamics = latent_dynamics(recent)
        window = window_size(dynamics, opts.window_rule, opts.window_min, opts.window_max)
        return int(window), round(float(dynamics), 4)

    def _scores(self, bank: torch.Tensor, chunk_poses: torch.Tensor) -> torch.Tensor:
        """Best similarity of each older frame ``(M, 4, 4)`` to any of the chunk's cameras: ``(M,)``."""
        bounds = None if self.bounds is None else self.bounds.to(bank.device)
        per_camera = [
            similarity(camera, bank, self.options.similarity, bounds, self.near, self.far) for camera in chunk_poses
        ]
        return torch.stack(per_camera).amax(0)

    def _memory(self, scores: torch.Tensor) -> list[int]:
        """Indices of the kept memory frames, ascending: the ``memory_k`` best (ties: earliest),
        of those at or above the keep threshold when the controller is on."""
        order = torch.sort(scores, descending=True, stable=True).indices[: self.memory_k]
        if self.options.enabled:
            order = order[scores[order] >= self.options.keep_threshold]
        return sorted(order.tolist())

    def _fill(self, memory: list[int], scores: torch.Tensor, capacity: int, recent: int) -> list[int]:
        """``memory`` topped up with the next-best older frames, whatever their score, up to
        ``memory_k`` and the capacity, when the plan at ``capacity`` would visit more than
        ``fill_density`` of its token pairs (``ContextOptions``); else ``memory`` itself."""
        opts = self.options
        kept = len(memory) + recent
        if not opts.enabled or self.layout is None or kept == capacity:
            return memory
        if visited_share(self.layout(capacity), kept) <= opts.fill_density:
            return memory
        room = min(self.memory_k, capacity - recent)
        return sorted(torch.sort(scores, descending=True, stable=True).indices[:room].tolist())

    def _capacity(self, frames: int) -> int:
        return bucket_for(frames, self.buckets) if self.options.enabled else self.max_context


def check_layout_function(layout: object, capacities: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``layout`` is a function ``capacity -> SequenceLayout`` whose
    layout at each of ``capacities`` has that many context frames."""
    if not callable(layout):
        raise ValueError(f"layout must be a function capacity -> SequenceLayout (the token layout at each context "
                         f"capacity, e.g. lambda capacity: SequenceLayout(capacity, ...)), got {type(layout).__name__}")
    for capacity in capacities:
        sequence = layout(capacity)
        if not isinstance(sequence, SequenceLayout) or sequence.context_frames != capacity:
            got = (f"{sequence.context_frames} context frames" if isinstance(sequence, SequenceLayout)
                   else type(sequence).__name__)
            raise ValueError(f"layout({capacity}) must be a SequenceLayout with {capacity} context frames (one per "
                             f"context slot), got {got}")

