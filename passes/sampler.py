"""The sampler pass: find the denoiser in the graph and put its model calls behind the denoising cache.

``sampler_pass`` (in ``PASSES``) looks for the sampler at both granularities users compile
(``sampler_match``): a graph that is a whole chunk with its unrolled denoising loop (one "sampler"
site per step, each with its model piece), or a graph that is one denoiser call (one site: its
latent and timestep inputs). It records the sites and leaves the graph unchanged; what it found
travels in ``gm.meta[META]`` to ``compile_with_cache``, which the backend calls instead of the inner
compiler. That one wraps the compiled code in a host runner (``sampler_runners``): a cache hit is a
Python decision between compiled calls, so hits and misses never cause a recompile and add no
graph break.

Why a host runner and not ``torch.cond`` in the graph: the decision needs the chunk's cameras and
the cache contents, which live on the host; reading them inside the graph would either guard on
them (recompiles) or make the graph take the stored output as an extra input on every call, and a
``torch.cond`` on a device flag reads the flag back to the host (a sync) on every model call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import fx

from li_compile.passes.attention import location
from li_compile.passes.sampler_match import NotSampler, match_steps, match_transformer
from li_compile.inner import InnerCompiler
from li_compile.passes.sampler_runners import ChunkRunner, ModelCallRunner
from li_compile.reporting import Compilation, Site

if TYPE_CHECKING:
    from li_compile.passes.pipeline import PassContext

log = logging.getLogger("li_compile")

KIND = "sampler"
META = "li_sampler"


def sampler_pass(gm: fx.GraphModule, ctx: "PassContext") -> None:
    """Find the sampler in ``gm``; record a "sampler" site for each step (or model call) found, or
    one skipped site saying why a graph that looked like a sampler is not cached; keep what was
    found in ``gm.meta[META]``. Graphs with no timestep input and no update stay unreported."""
    sites = ctx.compilation.sites
    if not ctx.options.cache.enabled:
        return
    try:
        steps = match_steps(gm)
    except NotSampler as not_chunk:
        try:
            site = match_transformer(gm)
        except NotSampler as not_call:
            if not_call.relevant and not not_chunk.relevant:  # a chunk function read as one model call: say both
                sites.append(Site(KIND, "skipped", reason=f"{not_call}; as a chunk function: {not_chunk}"))
                return
            for reason in (not_chunk, not_call):
                if reason.relevant:
                    sites.append(Site(KIND, "skipped", reason=str(reason)))
            return
        gm.meta[META] = site
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        detail = {"granularity": "model call", "timestep": site.timestep_name, "found_by": site.found_by,
                  "latent": inputs[site.latent_index].name, "per_frame_timesteps": site.per_frame}
        sites.append(Site(KIND, "rewritten", location=location(inputs[site.timestep_index]) or "", detail=detail))
        return
    gm.meta[META] = steps
    for index, step in enumerate(steps):
        detail = {"granularity": "chunk", "step": index, "steps": len(steps), "model_output": step.v.name,
                  "update": step.update.name, "piece_nodes": len(step.piece)}
        sites.append(Site(KIND, "rewritten", location=location(step.update), detail=detail))


def compile_with_cache(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    inner: InnerCompiler,
    mode: str | None,
    compilation: Compilation,
) -> Callable:
    """Compile ``gm`` with ``inner``; if ``sampler_pass`` found a sampler in it, return the compiled
    code behind the denoising cache (of the model running it: ``li_compile.running``) (``ModelCallRunner`` or ``ChunkRunner``). If the chunk graph
    cannot be split, compile it whole (no cache) and turn its sampler sites to skipped, with why."""
    found = gm.meta.get(META)
    if found is None:
        return inner(gm, example_inputs, mode)
    if not isinstance(found, list):
        return ModelCallRunner(inner(gm, example_inputs, mode), gm, found)
    try:
        return ChunkRunner(gm, found, inner, mode, lambda reason: compilation.note(Site("graph", "skipped", reason=reason)))
    except Exception as exc:  # noqa: BLE001 - a split we cannot make costs the cache, never correctness
        reason = f"could not split the chunk graph into per-step pieces ({type(exc).__name__}: {exc}); compiled whole"
        log.warning("light_interaction: %s", reason)
        compilation.sites[:] = [
            Site(KIND, "skipped", reason=reason, location=s.location, detail=s.detail)
            if s.kind == KIND and s.status == "rewritten" else s
            for s in compilation.sites
        ]
        return inner(gm, example_inputs, mode)
