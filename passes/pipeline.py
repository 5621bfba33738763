"""The ordered list of FX passes the backend runs, and how it runs them.

A pass is a function ``pass_fn(gm, ctx) -> None`` that rewrites ``gm`` (a torch-level FX graph,
as Dynamo hands it to the backend) in place and records every site it looked at in
``ctx.compilation.sites``. Passes run on a working copy of the graph: if any pass raises, the
copy is dropped, the reason is recorded, and the untouched graph goes to the inner compiler, so
a pass bug costs speed, never correctness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx

from li_compile.options import Options
from li_compile.passes.attention import attention_pass
from li_compile.passes.graph_copy import copy_module
from li_compile.passes.sampler import sampler_pass
from li_compile.plan import Plan
from li_compile.reporting import Compilation, Site

log = logging.getLogger("li_compile")


@dataclass
class PassContext:
    """What a pass may read (options, example inputs, the ``dynamic=`` torch.compile was given),
    where it records its sites, and the compiled model's plan slots."""

    options: Options
    example_inputs: Sequence[torch.Tensor]
    compilation: Compilation
    plan: Plan
    dynamic: Any = False


GraphPass = Callable[[fx.GraphModule, PassContext], None]

# Filled by later passes, in the order they must run.
PASSES: list[GraphPass] = [attention_pass, sampler_pass]


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[GraphPass] | None = None) -> fx.GraphModule:
    """Run ``passes`` (default ``PASSES``) on a copy of ``gm``; return the rewritten copy, or ``gm``
    itself with a skipped "graph" site recording why, if a pass failed."""
    passes = PASSES if passes is None else passes
    if not passes:
        return gm
    work = copy_module(gm)
    recorded = len(ctx.compilation.sites)
    try:
        for graph_pass in passes:
            graph_pass(work, ctx)
        work.graph.lint()
        work.recompile()
    except Exception as exc:  # noqa: BLE001 - any pass failure means: compile the original graph
        reason = f"pass {getattr(graph_pass, '__name__', graph_pass)} failed ({type(exc).__name__}: {exc}); graph left as written"
        log.warning("light_interaction: %s", reason)
        del ctx.compilation.sites[recorded:]
        ctx.compilation.sites.append(Site(kind="graph", status="skipped", reason=reason))
        return gm
    return work
