"""The ``light_interaction`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject.toml), so
``torch.compile(model, backend="light_interaction")`` works without importing li_compile. Dynamo
calls it once per captured graph: it validates the options, finds the compiled model's
``Accelerator`` (``li_compile.accelerator``: its plan slots, cache and report), runs the FX passes
(``li_compile.passes.pipeline.PASSES``), records what they found, and hands the rewritten graph to
the inner compiler. A graph with symbolic shapes does all that once per concrete shape, at the
first call of that shape (``li_compile.specialize``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from li_compile.accelerator import Accelerator, RoutedGraph, accelerator_of, calling_target, dynamic_setting
from li_compile.inner import INNER
from li_compile.options import Options
from li_compile.passes.pipeline import PassContext, run_passes
from li_compile.passes.sampler import compile_with_cache
from li_compile.regions import Regions, compile_regions
from li_compile.reporting import Compilation, Site
from li_compile.specialize import ShapeSpecialized, is_symbolic


def light_interaction(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    options: Options | Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Compile one Dynamo graph: rewrite attention/sampler sites, then run the inner compiler.

    ``options``: the dict given to ``torch.compile(..., options=)`` (see ``li_compile.options``);
    ``mode``: ``torch.compile``'s mode, forwarded to Inductor.
    """
    opts = Options.from_user(options)
    if is_symbolic(example_inputs):  # dynamic=None/True: one static compile per concrete shape, at its first call
        return ShapeSpecialized(gm, example_inputs, lambda graph, inputs, reason: _compile(graph, inputs, opts, mode, reason))
    return _compile(gm, example_inputs, opts, mode)


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options, mode: str | None,
             symbolic_reason: str | None = None) -> Callable:
    """Passes, then the inner compiler behind the cache's runner; ``symbolic_reason``: why a symbolic
    graph runs as traced (a "graph" site in the report), eagerly: handed the first call's concrete
    inputs, an inner compiler such as Inductor would specialize the graph to them."""
    target, context = calling_target()
    # a graph whose model cannot be found gets an accelerator of its own: dense plans, no cache
    acc = accelerator_of(target, opts) if target is not None else Accelerator(opts, type(gm).__name__)
    compilation = acc.new_compilation(type(gm).__name__)
    acc.records_cuda_graphs |= records_cuda_graphs(mode)
    if symbolic_reason is not None:
        compilation.sites.append(Site(kind="graph", status="skipped", reason=symbolic_reason))
        compilation.inner = "eager"
    ctx = PassContext(options=opts, example_inputs=example_inputs, compilation=compilation, plan=acc.plan,
                      dynamic=dynamic_setting(context))
    rewritten = run_passes(gm, ctx)
    # The inner compiler, behind the denoising cache's host runner if the sampler pass found a sampler;
    # each call runs for the model that makes it (Dynamo shares graphs between instances of a class).
    inner = INNER["eager"] if symbolic_reason is not None else _inner(opts, mode, compilation)
    compiled = compile_with_cache(rewritten, example_inputs, inner, mode, compilation)
    return RoutedGraph(compiled, opts, acc, compilation)


def _inner(opts: Options, mode: str | None, compilation: Compilation) -> Callable:
    """The inner compiler of ``opts``, regional (``li_compile.regions``) unless ``regional=False`` or
    ``mode`` captures CUDA graphs (each captured graph holds its own weights' addresses)."""
    inner = INNER[opts.inner]
    if not opts.regional:
        return inner
    if records_cuda_graphs(mode):
        _record_regions(compilation, Regions(0, 1, f"mode {mode!r} captures CUDA graphs: compiled whole"))
        return inner
    return compile_regions(inner, lambda regions: _record_regions(compilation, regions),
                           lambda reason: compilation.note(Site("regions", "skipped", reason=reason)))


def records_cuda_graphs(mode: str | None) -> bool:
    """Whether ``torch.compile``'s ``mode`` makes Inductor record CUDA graphs (``"reduce-overhead"``,
    ``"max-autotune"``)."""
    return bool(mode and mode != "default" and torch._inductor.list_mode_options(mode).get("triton.cudagraphs"))


def _record_regions(compilation: Compilation, regions: Regions) -> None:
    """A "regions" site in the report: how a graph was cut, or why it compiles whole (once per text)."""
    if regions.reason is None:
        site = Site("regions", "rewritten", reason=f"{regions.blocks} repeated blocks cut into {regions.regions} "
                    "regions; identical regions compile once")
    else:
        site = Site("regions", "skipped", reason=f"compiled whole: {regions.reason}")
    compilation.note(site)
