"""One accelerated model: its options, plan slots, context controller, denoising cache and report.

``torch.compile(model, backend="light_interaction", options=...)`` gives the model an
``Accelerator`` the first time the backend compiles one of its graphs (or the first time the user
asks for it with ``li_compile.accelerator(compiled)``). It is kept on the user's module (or
function) itself, one per distinct options, so its lifetime is the model's and two models never
share any of it: each has its own plan slots (``li_compile.plan``), its own controller and cache,
and ``li_compile.report(compiled)`` lists only its own graphs and chunks.

The user's chunk loop talks to it directly::

    li = li_compile.accelerator(compiled)
    li.configure(memory_k=4, fov_y_deg=60, layout=my_layout, revisit_inputs=("context", "camera"))
    li.warm_up(lambda capacity: compiled(*example_at(capacity)))
    for c in range(chunks):
        with li.chunk(c, past_poses, chunk_poses, past_latents, sigmas) as chunk:
            context, valid = chunk.context(past_latents), chunk.valid
            for step in range(steps):
                chunk.step(step)
                v = compiled(x, sigmas[step], context, valid, ...)
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import sys
import types
import warnings
from typing import Any, Callable, Hashable, Sequence

import torch

from li_compile.audit import Audit
from li_compile.cache_key import (
    DigestMemo, WeightsIdentity, check_revisit_inputs, conditioning_digest, named_arguments,
)
from li_compile.calibrating import DEFAULT_ROWS, AttentionLayers, CalibrationRun
from li_compile.context_rows import ContextRowReuse
from li_compile.controller.buckets import CAPACITY_FRACTIONS
from li_compile.controller.calibration import Calibration, widening_ladder
from li_compile.controller.context import DEFAULT_MEMORY_K, ContextController
from li_compile.controller.selection import ContextSelection, pad_frames, valid_slots
from li_compile.controller.similarity import DEFAULT_FAR, DEFAULT_NEAR
from li_compile.controller.tile_plan import TilePlanParams
from li_compile.denoise_runtime import DenoiseRuntime
from li_compile.options import Options
from li_compile.plan import Plan
from li_compile.reporting import ChunkStats, Compilation, Report
from li_compile.row_blocks import RowBlocks
from li_compile.running import running_for
from li_compile.sequence import SequenceLayout

CALIBRATION_STEPS = 4  # default calibration candidates: recent radius 0-3 tiles, visibility margin 0-0.3
ATTRIBUTE = "_li_accelerators"  # on the user's module or function: {Options: Accelerator}
BLOCKS_ATTRIBUTE = "_li_compiled_blocks"  # on a model li_compile.compile_repeated_blocks compiled: BlocksCompiled
BACKEND = "light_interaction"
CUDA_GRAPH_ROUTES = "it records CUDA graphs (mode='reduce-overhead'), which replay the plans' kernel routes of their warm-up"


class Accelerator:
    """The runtime state of one model compiled with ``backend="light_interaction"`` (module docstring).

    ``options``: the validated compile options; ``name``: the model's name in reports."""

    def __init__(self, options: Options, name: str) -> None:
        self.options, self.name = options, name
        self.plan = Plan()
        self.denoise = DenoiseRuntime(options.cache)
        required = options.context.reuse_rows is True
        auto = options.context.reuse_rows == "auto" and options.sparsity.enabled and options.context.enabled
        self.context_rows = ContextRowReuse(self.denoise.matched, required) if required or auto else None
        if self.context_rows is not None and options.context.row_blocks:
            self.context_rows.blocks = RowBlocks(self.context_rows)
        self.controller: ContextController | None = None
        self.revisit_inputs: frozenset[str] = frozenset()
        self.compilations: list[Compilation] = []  # graphs it compiled, and graphs of others it runs
        self.calibration: Calibration | None = None  # the per-head plans in effect
        self.layers = AttentionLayers()  # the attention layers of the graphs it ran, as calibrations name them
        self.audit: Audit | None = None  # the latest li_compile.audit of this model
        self.boundary_cache: str | None = None  # how li_compile.cached calls this model, if it does
        self.records_cuda_graphs = False  # a graph of it compiled in a mode that records CUDA graphs
        self._warm_up_call: Callable[[int], object] | None = None  # warm_up's, run again by use_calibration
        self.open_chunk: ChunkScope | None = None  # the chunk scope entered and not yet exited
        self._weights, self._digests = WeightsIdentity(), DigestMemo()
        self._graph_ids = itertools.count(1)

    def __repr__(self) -> str:
        return (f"Accelerator({self.name}, {len(self.compilations)} graph(s), {len(self.plan)} plan slot(s), "
                f"{len(self.denoise.cache)} cache entries)")

    # --- set-up -------------------------------------------------------------------------------

    def configure(
        self,
        *,
        memory_k: int = DEFAULT_MEMORY_K,
        layout: Callable[[int], SequenceLayout] | None = None,
        fov_y_deg: float | None = None,
        bounds: torch.Tensor | None = None,
        aspect: float = 1.0,
        near: float = DEFAULT_NEAR,
        far: float = DEFAULT_FAR,
        capacity_fractions: tuple[float, ...] = CAPACITY_FRACTIONS,
        revisit_inputs: Sequence[str] = (),
    ) -> "Accelerator":
        """Describe the world to the model's context controller: the most memory frames per chunk
        (``memory_k``), the attention token ``layout(capacity)`` (without it, no sparse plan is
        written), the lens (``fov_y_deg`` + ``aspect`` or ``bounds (4,)``), the depth range, the
        capacity buckets, and ``revisit_inputs``: names of forward arguments that derive from the
        cameras or the selected context (they may differ on a revisit and stay out of the cache
        key; every other input is part of it). Returns ``self``. All or nothing: where the new
        setting refuses the calibration in effect (``use_calibration``), it raises and nothing changes."""
        if isinstance(revisit_inputs, str) or not all(isinstance(n, str) for n in revisit_inputs):
            raise ValueError(f"revisit_inputs must be a sequence of argument names, got {revisit_inputs!r}")
        controller = ContextController(
            self.options.context, self.plan, sparsity=self.options.sparsity, memory_k=memory_k, bounds=bounds,
            fov_y_deg=fov_y_deg, aspect=aspect, near=near, far=far, capacity_fractions=capacity_fractions, layout=layout,
        )
        if self.calibration is not None:  # a calibration outlives a reconfiguration that it fits
            self.check_layers(self.calibration, controller)
            controller.use_calibration(self.calibration)
        self.controller, self.revisit_inputs = controller, frozenset(revisit_inputs)
        if self.context_rows is not None:
            self.context_rows.set_layouts(map(layout, self.controller.warm_up_buckets()) if layout is not None else ())
            named = [f"context.{n}" for n in ("reuse_rows", "row_blocks") if getattr(self.options.context, n) is True]
            if not self.context_rows.rows and named:
                verb = "has" if len(named) == 1 else "have"
                warnings.warn(f"{self.name}: option {' and '.join(named)} {verb} nothing to act on: "
                              + ("no layout was configured" if layout is None else "the layout's queries are the "
                                 "chunk's only (a KV-cache model) or it has no context frames"), stacklevel=2)
        return self

    def warm_up(self, call: Callable[[int], object]) -> None:
        """Compile every context capacity the controller may pick, and run both attention routes at
        each (the block-sparse kernel, which compiles and autotunes, and dense SDPA), before the first
        chunk: ``call(capacity)`` runs the model once on a context of that many slots (all padding is
        fine), and is called once per capacity; twice where the model compiled in a mode that records
        CUDA graphs (``mode="reduce-overhead"``: a graph records on its second call, with the warm-up
        plan, whose replays then follow every later plan). See ``ContextController.warm_up``. The
        call is kept: ``use_calibration`` warms up again with the calibrated plans."""
        self._controller().warm_up(call, repeat=lambda: self.records_cuda_graphs)
        self._warm_up_call = call
        self._refuse_cuda_graphs(self.calibration)  # (known only once its graphs compiled)

    @property
    def calibrating(self) -> CalibrationRun | None:
        """The calibration measuring this model's chunks now (``calibrate``'s scope), or None."""
        return None if self.controller is None else self.controller.calibrating

    def calibrate(self, target: float = 0.99, candidates: Sequence[TilePlanParams] | None = None,
                  rows: int = DEFAULT_ROWS) -> "CalibrationScope":
        """A scope for a few chunks of the chunk loop (run them inside it) that measures, per layer and
        head, the attention mass each candidate tile plan keeps (``li_compile.calibrating``), with
        the chunks computed dense; on exit it picks the narrowest candidate reaching ``target`` per
        layer and head (heads no candidate serves stay dense) and uses it for every later chunk
        (``use_calibration``). ``candidates``: narrowest first, each plan a superset of the one before
        (default: ``widening_ladder`` from radius 0, margin 0 and frame-local context rows,
        ``CALIBRATION_STEPS`` steps, then the widest with camera and with dense context rows); ``rows``:
        query rows measured per site call. The scope's ``calibration`` holds the result. ``ValueError``
        at once, naming why, where no chunk would get a tile plan to measure (``calibration_refusal``)."""
        controller = self._controller()
        if self.records_cuda_graphs:
            raise ValueError(f"{self.name} cannot be calibrated: {CUDA_GRAPH_ROUTES}")
        refusal = controller.calibration_refusal()
        if refusal is not None:
            raise ValueError(f"{self.name} cannot be calibrated: no chunk gets a tile plan to measure, as {refusal}")
        if candidates is None:  # from the narrowest plan up: radius 0, margin 0 and frame-local context rows
            narrowest = dataclasses.replace(controller.tile_params, recent_radius=0, visibility_margin=0.0,
                                            context_queries="frame_local")
            candidates = widening_ladder(narrowest, CALIBRATION_STEPS)
        return CalibrationScope(self, CalibrationRun(candidates, target, rows))

    def use_calibration(self, calibration: Calibration | None) -> None:
        """Write one plan per head from ``calibration`` (e.g. ``Calibration.from_json`` of a saved one)
        in every later chunk; None goes back to the options' single plan. The report shows its recall.
        ``ValueError`` naming why when the calibration cannot act on this model
        (``ContextController.use_calibration``) or was measured on other attention layers
        (``check_layers``), or where the model records CUDA graphs (they keep the plans' kernel
        routes of their warm-up). After ``warm_up``, its call runs again (one call per capacity
        bucket, no gradients) with the calibrated plans, whose kernel shapes (a chunk's span split
        off where the options' plans had none) then compile here rather than in a chunk."""
        if self.open_chunk is not None:
            raise ValueError(f"{self.name}: a calibration is applied between chunks, not inside chunk "
                             f"{self.open_chunk.chunk}'s scope (its plan is written, and its cache entries open)")
        if calibration is not None:
            self._refuse_cuda_graphs(calibration)
            self.check_layers(calibration, self._controller())
        previous = self.calibration
        self._controller().use_calibration(calibration)
        self.calibration = calibration
        if calibration is not None and self._warm_up_call is not None:
            try:
                with torch.no_grad():
                    self._controller().warm_up(self._warm_up_call)
            except BaseException:  # not applied: the calibration in effect before stays
                self._controller().use_calibration(previous)
                self.calibration = previous
                raise

    def _refuse_cuda_graphs(self, calibration: Calibration | None) -> None:
        """ValueError where ``calibration`` acts on a model that records CUDA graphs: they replay the
        plans' kernel routes of their warm-up, which a calibration may change."""
        if calibration is not None and self.records_cuda_graphs:
            raise ValueError(f"{self.name} refuses a calibration: {CUDA_GRAPH_ROUTES}, which a calibration may change; "
                             "compile it without a mode that records CUDA graphs to use one")

    def check_layers(self, calibration: Calibration, controller: ContextController) -> None:
        """ValueError unless ``calibration``, if measured on a model (``made_for``), was measured on
        one like this one: its layers must be named for this model (``{name}.graphN.attentionI``), and
        once this model ran graphs with layers at the video layouts of ``controller``, their layer
        counts must be the calibration's graphs' (another depth has other counts). Graph numbers
        follow the order graphs compile in (``dynamic=None``, a reset), so they are not compared. A
        graph not run yet is checked at the first chunk after it ran (``ChunkScope``), before that
        chunk's plan is written."""
        if calibration.made_for is None or controller.layout is None:  # (no layout: the controller refuses it)
            return
        graphs: dict[str, set[str]] = {}
        for layer in calibration.choice:
            graphs.setdefault(layer.rpartition(".attention")[0], set()).add(layer)
        foreign = sorted(g for g in graphs if g.rpartition(".graph")[0] != self.name)
        if foreign:
            raise ValueError(f"this calibration was measured on the layers of graphs {foreign}, not on "
                             f"{self.name}'s ({self.name}.graphN): it was made for another model; calibrate this one")
        counts, shapes = {len(layers) for layers in graphs.values()}, controller.video_shapes()
        ours = {graph: len(self.layers.layers(graph, shapes)) for graph in sorted(self.layers.shapes)}
        ours = {graph: n for graph, n in ours.items() if n}
        if ours and set(ours.values()) != counts:  # (a graph break splits a forward: depth 3 as 1 + 2, depth 2 as 1 + 1)
            raise ValueError(
                f"this calibration measured graphs of {sorted(counts)} attention layer(s) at the video layouts, and "
                f"this model ran graphs of {sorted(set(ours.values()))} ({', '.join(f'{g}: {n}' for g, n in ours.items())}): "
                "it was made for another depth; calibrate this one"
            )

    def reset(self) -> None:
        """Forget cached outputs and per-chunk statistics; plans dense again (compiled graphs stay).
        Inside a chunk scope the chunk is closed: its remaining calls run dense, without the cache.
        Where reusing context rows already made that chunk's output wrong, its ``RuntimeError`` is
        raised once everything is forgotten."""
        self.open_chunk = None
        try:
            self.denoise.reset()
        finally:
            try:
                if self.context_rows is not None:
                    self.context_rows.reset()
            finally:
                self.plan.clear()
                if self.controller is not None:
                    self.controller.stats.clear()

    # --- per chunk ----------------------------------------------------------------------------

    def chunk(
        self,
        chunk: int,
        past_poses: torch.Tensor,
        chunk_poses: torch.Tensor,
        past_latents: torch.Tensor,
        sigmas: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor | None = None,
    ) -> "ChunkScope":
        """The scope of one chunk: on entry the controller selects the context and writes the plans,
        and the denoising cache opens the chunk; on exit it closes and the plans are dense again. ``past_poses (N, 4, 4)``,
        ``chunk_poses (F, 4, 4)`` camera-to-world, ``past_latents (N, ...)`` one per past frame,
        ``sigmas (steps + 1,)`` the chunk's noise schedule, or ``(steps + 1, F)`` one per frame
        (diffusion forcing; a frame is then served only from past frames on the same schedule), or
        None (the cache keeps raw outputs)."""
        return ChunkScope(self, chunk, past_poses, chunk_poses, past_latents, sigmas)

    # --- what the backend and the runners use ----------------------------------------------------

    def new_compilation(self, code_name: str) -> Compilation:
        """Record one call of the backend for this model (its sites are filled by the passes)."""
        comp = Compilation(graph_name=f"{self.name}.graph{next(self._graph_ids)}", code_name=code_name,
                           inner=self.options.inner)
        self.compilations.append(comp)
        return comp

    def runs(self, compilation: Compilation) -> None:
        """Record that this model runs ``compilation``'s graph (Dynamo shares graphs between
        instances of a class: the instance that compiled it first has it already)."""
        if not any(c is compilation for c in self.compilations):
            self.compilations.append(compilation)

    def prefetch_cache_key(self) -> None:
        """Start the next chunk's weight norms (``WeightsIdentity.prefetch``) before it is planned."""
        if self.options.cache.enabled:
            self._weights.prefetch(self.denoise.chunks_begun + 1)

    def cache_key(self, weights: Sequence[torch.Tensor], conditioning: Sequence[object]) -> Hashable:
        """The denoising-cache key of a call: its weights' identity token and its conditioning
        digest (``li_compile.cache_key``)."""
        epoch = self.denoise.chunks_begun  # weights' norms and conditioning digests are read once per chunk
        return self._weights.token(weights, epoch), conditioning_digest(self._digests, conditioning, epoch)

    def report(self) -> Report:
        """What was rewritten (every compiled graph of this model) and per-chunk statistics."""
        if not self.compilations:
            raise ValueError(
                f"{self.name} has not been compiled by the light_interaction backend yet: torch.compile is lazy, "
                "call the compiled model once, then ask for its report"
            )
        merged: dict[int, ChunkStats] = {}
        context = self.controller.stats if self.controller is not None else []
        rows = [] if self.context_rows is None else self.context_rows.history
        for stats in [*context, *self.denoise.history, *rows]:
            merged.setdefault(stats.chunk, ChunkStats(stats.chunk)).values.update(stats.values)
        compilations = [self._with_plan_reach(c) for c in self.compilations]
        return Report(self.name, compilations, [merged[c] for c in sorted(merged)],
                      None if self.calibration is None else self.calibration.table(),
                      None if self.audit is None else str(self.audit), self.boundary_cache, self._cache_idle())

    def _cache_idle(self) -> str | None:
        """Why the denoising cache, enabled, never had a call to act on in the chunks run, where no
        sampler site says so; else None."""
        if not self.options.cache.enabled or self.boundary_cache is not None or not self.denoise.history:
            return None
        if any(site.kind == "sampler" for c in self.compilations for site in c.sites):
            return None  # a sampler site was found: rewritten, or skipped with its own reason
        return ("never acted: no compiled graph holds a denoiser call it recognises (a latent and its timestep; "
                "with only the blocks compiled, li_compile.compile_repeated_blocks, none does). Call the model "
                "through li_compile.cached(model, latent=..., timestep=...)")

    def _with_plan_reach(self, compilation: Compilation) -> Compilation:
        """``compilation`` with a reason on every rewritten attention site whose sequence is not the
        video layout at any context capacity (e.g. a text refiner's self-attention): no plan is ever
        written for it, so it runs dense."""
        shapes = None if self.controller is None else self.controller.video_shapes()
        if shapes is None:
            return compilation
        sites = []
        for site in compilation.sites:
            q_len, kv_len = site.detail.get("shape", (0, 0, 0, 0))[2:]
            if site.kind == "attention" and site.status == "rewritten" and (q_len, kv_len) not in shapes:
                reason = f"runs dense: {q_len} x {kv_len} tokens is not the video layout at any context capacity"
                site = dataclasses.replace(site, reason=reason)
            sites.append(site)
        return dataclasses.replace(compilation, sites=sites)

    def _controller(self) -> ContextController:
        if self.controller is None:
            raise ValueError(f"{self.name}: call accelerator.configure(...) first (memory_k, lens, layout)")
        return self.controller


class CalibrationScope:
    """The scope of ``Accelerator.calibrate``: chunks run inside it are measured; ``calibration``
    is set on a clean exit (and then in effect)."""

    def __init__(self, accelerator: Accelerator, run: CalibrationRun) -> None:
        self.accelerator, self.run = accelerator, run
        self.calibration: Calibration | None = None

    def __enter__(self) -> "CalibrationScope":
        if self.accelerator.calibrating is not None:
            raise RuntimeError(f"{self.accelerator.name} is calibrating already: calibrations do not nest")
        self.accelerator._controller().calibrating = self.run
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.accelerator._controller().calibrating = None
        if kind is None:
            self.calibration = self.run.finish()
            self.accelerator.use_calibration(self.calibration)


class ChunkScope:
    """One chunk of one accelerated model (``Accelerator.chunk``); use it as a context manager.

    Inside: ``selection`` (which past frames, ``ContextSelection``), ``capacity``, ``valid``
    ``(capacity,)`` bool (slots holding a frame: right-aligned, padding first), ``context(values)``
    to pad any per-frame history to the slots, and ``step(i)`` to tell the cache which denoising step
    the next model calls belong to (optional: without it the n-th call is step n)."""

    def __init__(self, accelerator: Accelerator, chunk: int, past_poses: torch.Tensor, chunk_poses: torch.Tensor,
                 past_latents: torch.Tensor, sigmas: Sequence[float] | torch.Tensor | None) -> None:
        self.accelerator, self.chunk = accelerator, chunk
        self._args = (past_poses, chunk_poses, past_latents, sigmas)
        self.selection: ContextSelection | None = None

    def __enter__(self) -> "ChunkScope":
        past_poses, chunk_poses, past_latents, sigmas = self._args
        acc = self.accelerator
        if acc.open_chunk is not None:
            raise RuntimeError(f"{acc.name}: chunk {acc.open_chunk.chunk} is open: chunk scopes do not nest (exit "
                               f"it before entering chunk {self.chunk})")
        controller = acc._controller()
        planned = len(controller.stats)
        try:
            checked = acc.denoise.check_chunk(chunk_poses, sigmas)  # before any planning: a refusal leaves no state
            if acc.calibration is not None:  # graphs run since it was applied
                acc._refuse_cuda_graphs(acc.calibration)
                acc.check_layers(acc.calibration, controller)
            acc.prefetch_cache_key()  # the weights' norms compute on the device while the host plans
            self.selection = controller.select(self.chunk, past_poses, chunk_poses, past_latents)
            self.capacity = self.selection.capacity
            self.valid = valid_slots(self.selection, self.capacity)
            acc.denoise.open_chunk(self.chunk, *checked)
        except BaseException:  # the chunk never opened: later calls outside a chunk run dense
            acc.plan.clear()
            del controller.stats[planned:]
            raise
        if acc.context_rows is not None:
            acc.context_rows.begin_chunk(self.chunk, None if sigmas is None else len(sigmas) - 1)
        acc.open_chunk = self
        return self

    def __exit__(self, kind: type | None, *exc: Any) -> None:
        """Close the chunk; one that raised (``kind``) stores nothing in the cache and decides
        nothing about ``context.reuse_rows``. Nothing to close after ``li.reset()`` inside the scope."""
        acc = self.accelerator
        if acc.open_chunk is not self:
            return
        acc.open_chunk = None
        failed = kind is not None
        try:
            acc.denoise.end_chunk(failed)
        except BaseException:  # the chunk ended wrongly (its steps misnumbered): it decides nothing either
            failed = True
            raise
        finally:  # a plan holds for its chunk only: later calls outside a chunk run dense
            acc.plan.clear()
            if acc.context_rows is not None:
                acc.context_rows.end_chunk(failed)

    def context(self, values: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Per-frame history ``values (N, ...)`` -> ``(capacity, ...)``: the selected frames
        right-aligned, ``fill`` in the padding slots (e.g. ``torch.eye(4)`` for poses)."""
        return pad_frames(values, self.selection, self.capacity, fill)

    def step(self, step: int) -> None:
        """Denoising ``step`` starts: the model calls until the next ``step`` belong to it (nothing
        after ``li.reset()`` closed the chunk)."""
        if self.accelerator.open_chunk is not self:
            return
        self.accelerator.denoise.set_step(step)
        if self.accelerator.context_rows is not None:
            self.accelerator.context_rows.set_step(step)


class RoutedGraph:
    """A compiled graph that runs for whichever accelerated model calls it.

    Dynamo reuses one graph for every instance of a module class (weights are graph inputs), so
    each call finds its caller (``calling_target``) and runs with that model's accelerator as the
    running one (``li_compile.running``): its plan slots, its cache. ``fallback``: the accelerator
    of a call whose model cannot be found (its plans stay dense and no chunk is ever open in it)."""

    def __init__(self, compiled: Callable, options: Options, fallback: Accelerator, compilation: Compilation) -> None:
        self.compiled, self.options, self.fallback, self.compilation = compiled, options, fallback, compilation
        self._signatures: dict[Any, inspect.Signature | None] = {}  # by the called function's code (call_signature)

    def __call__(self, *args: Any) -> Any:
        frame = _compile_wrapper_frame()
        target = _target_of(frame)
        accelerator = accelerator_of(target, self.options) if target is not None else self.fallback
        accelerator.runs(self.compilation)
        accelerator.layers.begin_graph_call(self.compilation.graph_name)
        with running_for(accelerator, lambda: self._arguments(frame, target, accelerator)):
            out = self.compiled(*args)
        accelerator.layers.end_graph_call()
        return out

    def _arguments(self, frame: Any, target: Any, accelerator: Accelerator) -> dict[str, Any]:
        """The user's call's arguments by name (for a compiled module, the signature an instance
        declares, as a wrapper module does, else its forward's; else the compiled method's or
        function's; a ``**kwargs`` parameter's arguments by their
        own names (``"kwargs['x']"`` where a parameter is named ``x``), a ``*args`` parameter's as
        ``"args[0]"``, ...; by position, ``"0"``, ``"1"``, ..., where it does not bind them), or empty
        when unknown. ``ValueError`` where ``accelerator``'s ``revisit_inputs`` name no parameter
        of that signature (``check_revisit_inputs``)."""
        if frame is None or target is None:
            return {}
        args, kwargs = frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {})
        signature = call_signature(target, frame.f_locals.get("fn"), self._signatures)
        try:
            bound = signature.bind(*args, **kwargs) if signature is not None else None
        except TypeError:
            bound = None
        if bound is None:
            return {**{str(i): a for i, a in enumerate(args)}, **kwargs}
        arguments = named_arguments(bound)
        check_revisit_inputs(accelerator.revisit_inputs, signature, type(target).__qualname__, arguments)
        return arguments


def calibrate(compiled: Any, target: float = 0.99, candidates: Sequence[TilePlanParams] | None = None,
              rows: int = DEFAULT_ROWS) -> CalibrationScope:
    """``accelerator(compiled).calibrate(...)``: a scope for a few chunks that calibrates the model's
    tile plans to keep ``target`` of the attention mass per layer and head (``Accelerator.calibrate``)."""
    return accelerator(compiled).calibrate(target, candidates, rows)


# --- finding a model's accelerator ----------------------------------------------------------------


def accelerator(compiled: Any) -> Accelerator:
    """The ``Accelerator`` of ``compiled``: what ``torch.compile(model_or_fn, backend="light_interaction",
    options=...)`` returned, a module compiled in place with ``module.compile(...)``, or a model whose
    blocks ``li_compile.compile_repeated_blocks`` compiled. Created on
    first use, so it can be configured before the first (lazy) compilation. A model behind the
    cache at its call boundary (``li_compile.cached(compiled, ...)``) has its compiled model's."""
    if isinstance(getattr(compiled, "accelerator", None), Accelerator):
        return compiled.accelerator
    blocks = blocks_options(compiled)  # li_compile.compile_repeated_blocks
    if blocks is not None:
        return accelerator_of(compiled, blocks)
    target, context = _compiled_target(compiled)
    settings = _compile_settings(context)
    if settings is not None and settings.compiler_name == BACKEND:
        return accelerator_of(target, Options.from_user(settings.kwargs.get("options")))
    # a backend wrapping light_interaction (a test counter, a partial): the one it already made
    made = list(target.__dict__.get(ATTRIBUTE, {}).values())
    if len(made) == 1:
        return made[0]
    got = "no torch.compile settings" if settings is None else f"backend {settings.compiler_name!r}"
    raise ValueError(
        f"li_compile.accelerator() needs a model compiled with backend={BACKEND!r}, got {got} "
        f"({len(made)} light_interaction accelerators on it: call the compiled model once first)"
    )


class BlocksCompiled:
    """The mark ``li_compile.compile_repeated_blocks`` leaves on a model: the ``options`` its blocks
    were compiled with, and ``how`` (``dynamic``, ``min_blocks`` and the other ``module.compile``
    arguments). A deep copy or a pickle of the model runs eager (torch drops each block's compiled
    call, as for any module compiled in place), so the mark is not copied: it becomes None."""

    def __init__(self, options: Options, how: dict[str, Any]) -> None:
        self.options, self.how = options, how

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (type(None), ())


def blocks_options(model: Any) -> Options | None:
    """The options ``li_compile.compile_repeated_blocks`` compiled ``model``'s blocks with, or None."""
    mark = getattr(model, "__dict__", {}).get(BLOCKS_ATTRIBUTE)
    return None if mark is None else mark.options


class _Accelerators(dict):
    """A model's accelerators by options. A copy of the model (``copy.copy``, ``copy.deepcopy``,
    pickling) starts with none: its compiled graphs must get plan slots of their own."""

    def __copy__(self) -> "_Accelerators":
        return _Accelerators()

    def __deepcopy__(self, memo: dict) -> "_Accelerators":
        return _Accelerators()

    def __reduce__(self) -> tuple:
        return (_Accelerators, ())


def accelerator_of(target: Any, options: Options) -> Accelerator:
    """The accelerator ``target`` (the user's module or function) has for ``options``, made on first use."""
    table = target.__dict__.setdefault(ATTRIBUTE, _Accelerators())
    if options not in table:
        table[options] = Accelerator(options, _name(target))
    return table[options]


def share_accelerators(owner: Any, member: Any) -> None:
    """Let ``member`` (a module inside ``owner``, compiled on its own) find ``owner``'s accelerators:
    its compiled graphs then run with ``owner``'s plans, cache and report."""
    member.__dict__[ATTRIBUTE] = owner.__dict__.setdefault(ATTRIBUTE, _Accelerators())


def calling_target() -> tuple[Any, Any]:
    """The user's module or function whose compiled call is on the stack (being compiled, or
    running), or None if it cannot be found, and Dynamo's context of that ``torch.compile`` (None
    likewise). Found by walking the Python stack up to Dynamo's ``compile_wrapper`` frame."""
    frame = _compile_wrapper_frame()
    return _target_of(frame), None if frame is None else frame.f_locals.get("self")


def _compile_wrapper_frame() -> Any:
    """The innermost frame of Dynamo's ``compile_wrapper`` on the Python stack, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "compile_wrapper" and frame.f_code.co_filename.endswith("eval_frame.py"):
            return frame
        frame = frame.f_back
    return None


def _target_of(frame: Any) -> Any:
    """The user's module or function that a ``compile_wrapper`` frame calls, or None."""
    if frame is None:
        return None
    target = _model_of(frame.f_locals.get("fn"))
    return target if hasattr(target, "__dict__") else None


def _model_of(fn: Any) -> Any:
    """The object a bound method ``fn`` belongs to (a module, a pipeline: the runtime state is that
    instance's, not the class's function's; taken before any decorator is unwrapped); else ``fn``
    unwrapped. ValueError for an instance that cannot hold attributes (``__slots__``): its instances
    would share one accelerator."""
    owner = getattr(fn, "__self__", None)
    if owner is None or isinstance(owner, (type, types.ModuleType)):  # a function, a classmethod
        return inspect.unwrap(fn)
    if not isinstance(owner, torch.nn.Module) and not isinstance(getattr(owner, "__dict__", None), dict):
        raise ValueError(f"{type(owner).__name__} instances hold no attributes (__slots__), where light_interaction "
                         "keeps a model's runtime state: compile a method of an object that can, or the module")
    return owner


def call_signature(target: Any, fn: Any, cache: dict | None = None) -> inspect.Signature | None:
    """The signature a call of ``fn`` (the callable ``torch.compile`` wrapped) on ``target`` (its model)
    binds its arguments by: a module called as a module (its call, or a ``__call__`` override taking
    only ``*args, **kwargs``) by the signature the instance declares (a wrapper module's) or its
    forward's; any other method or function by its own (through decorators, without ``self``). None
    where there is none. ``cache``: signatures by function code, kept across calls."""
    def own(f: Any) -> inspect.Signature | None:
        key = (getattr(inspect.unwrap(f), "__code__", f), isinstance(f, types.MethodType))
        if cache is not None and key in cache:
            return cache[key]
        try:
            found = inspect.signature(f)
        except (TypeError, ValueError):
            found = None
        if cache is not None:
            cache[key] = found
        return found

    if isinstance(target, torch.nn.Module):
        name = getattr(fn, "__name__", "") if getattr(fn, "__self__", None) is target else None
        overridden = own(fn) if name == "__call__" else None
        bare = overridden is not None and all(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in overridden.parameters.values())
        if fn is target or name in ("_call_impl", "_wrapped_call_impl", "forward") or bare:
            return vars(target).get("__signature__") or own(target.forward)
    signature = own(fn)
    first = next(iter(signature.parameters), None) if signature is not None else None
    if not isinstance(fn, types.MethodType) and first == "self":  # a method Dynamo unwrapped from its decorator
        return None  # and its instance: called with or without it, so bound by position (every value keyed)
    return signature


def dynamic_setting(context: Any) -> bool | None | str:
    """The ``dynamic=`` the user gave ``torch.compile`` (``"unknown"`` if it cannot be found)."""
    settings = _compile_settings(context)
    return "unknown" if settings is None else settings.dynamic


def compiled_signature(compiled: Any) -> inspect.Signature | None:
    """The signature a call of ``compiled`` (a ``torch.compile`` result, or a model whose blocks are
    compiled) binds its arguments by (``call_signature``)."""
    target, _ = _compiled_target(compiled)
    if isinstance(compiled, torch.nn.Module):  # the module itself was compiled (whole, in place, or its blocks)
        return call_signature(target, target)
    return call_signature(target, compiled._torchdynamo_orig_callable)


def _compiled_target(compiled: Any) -> tuple[Any, Any]:
    """(the user's module or function, Dynamo's context) of a ``torch.compile`` result, or (the
    model, None) for a model whose blocks ``li_compile.compile_repeated_blocks`` compiled."""
    if isinstance(compiled, torch.nn.Module) and blocks_options(compiled) is not None:
        return compiled, None
    if isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule):
        return compiled._orig_mod, compiled.dynamo_ctx
    impl = getattr(compiled, "_compiled_call_impl", None) if isinstance(compiled, torch.nn.Module) else compiled
    orig = getattr(impl, "_torchdynamo_orig_callable", None)
    if orig is None:
        raise ValueError(
            f"li_compile needs what torch.compile(..., backend={BACKEND!r}) returned (or a model passed to "
            f"li_compile.compile_repeated_blocks), got "
            f"{type(compiled).__name__} {getattr(compiled, '__name__', '')!s}, which was not compiled by torch.compile"
        )
    target = compiled if isinstance(compiled, torch.nn.Module) else _model_of(orig)
    cells = [c.cell_contents for c in (getattr(impl, "__closure__", None) or ())]
    context = next((c for c in cells if isinstance(c, torch._dynamo.eval_frame._TorchDynamoContext)), None)
    return target, context


def _compile_settings(context: Any) -> Any:
    """torch.compile's record of backend, options and ``dynamic`` behind a Dynamo context, or None."""
    callback = getattr(context, "callback", None)
    for _ in range(8):  # Dynamo wraps the backend a few times (error catching, debugging)
        if callback is None or isinstance(callback, torch._TorchCompileWrapper):
            return callback
        callback = getattr(callback, "_torchdynamo_orig_backend", None) or getattr(callback, "_torchdynamo_orig_callable", None)
    return None


def _name(target: Any) -> str:
    """The model's name in reports and calibrations: a module's or instance's class, a function's name."""
    return getattr(target, "__qualname__", None) or type(target).__name__
