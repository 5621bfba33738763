"""The ``light_interaction`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject.toml), so
``torch.compile(model, backend="light_interaction")`` works without importing li_compile. Dynamo
calls it once per captured graph: it validates the options, runs the FX passes
(``li_compile.passes.pipeline.PASSES``), records what they found for ``li_compile.report``, and hands
the rewritten graph to the inner compiler.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from li_compile.inner import INNER
from li_compile.options import Options
from li_compile.passes.pipeline import PassContext, run_passes
from li_compile.passes.sampler import compile_with_cache
from li_compile.reporting import Compilation, record_compilation


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
    inner = INNER[opts.inner]
    compilation = Compilation(
        graph_name=f"graph{_next_graph_id()}",
        code_name=type(gm).__name__,
        inner=opts.inner,
    )
    record_compilation(compilation)
    rewritten = run_passes(gm, PassContext(options=opts, example_inputs=example_inputs, compilation=compilation))
    # The inner compiler, behind the denoising cache's host runner if the sampler pass found a sampler.
    return compile_with_cache(rewritten, example_inputs, inner, mode, opts, compilation)


_graph_counter = iter(range(1, 1 << 62))


def _next_graph_id() -> int:
    return next(_graph_counter)
