"""Attention inside ``torch.compiler.nested_compile_region`` bodies.

A block whose forward is wrapped in ``torch.compiler.nested_compile_region`` is traced by Dynamo
once and called N times: the graph holds one body (a ``GraphModule`` attribute) and N
``invoke_subgraph`` calls of it, each passing that block's weights as operands. The attention sites
live in the body, so the attention pass rewrites the body once (on a copy, so a failed pass leaves
the graph as written) and every call runs the rewritten body. The plan slot tensors a rewritten site
reads become new placeholders of the body, fed by buffers of the outer graph appended to every call's
operands: a body must not hold tensors of its own, and the outer buffers reach the compiled code by
reference, so in-place plan updates need no recompile.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from li_compile.passes.attention_rewrite import Emitter, is_plan_buffer
from li_compile.passes.graph_copy import copy_module

INVOKE_SUBGRAPH = getattr(getattr(torch.ops, "higher_order", None), "invoke_subgraph", None)


def nested_bodies(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Body attribute name -> the ``invoke_subgraph`` calls of it in ``gm``, in graph order."""
    bodies: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if INVOKE_SUBGRAPH is None or node.op != "call_function" or node.target is not INVOKE_SUBGRAPH:
            continue
        body = node.args[0]
        if isinstance(body, fx.Node) and body.op == "get_attr":
            bodies.setdefault(str(body.target), []).append(node)
    return bodies


def rewrite_nested(gm: fx.GraphModule, rewrite: Callable[[fx.GraphModule], None]) -> None:
    """Run ``rewrite`` (the attention pass on one graph) on a copy of every body called in ``gm``,
    install the copy in ``gm``, and lift the plan buffers it added to operands of every call."""
    for name, calls in nested_bodies(gm).items():
        body = copy_module(gm.get_submodule(name))
        rewrite(body)
        lifted = _lift_plan_buffers(body)
        body.graph.lint()
        body.recompile()
        setattr(gm, name, body)
        if not lifted:
            continue
        emitter = Emitter(gm, calls[0])  # the buffers' reads go before the graph's first op: one set for every call
        outer = tuple(emitter.buffer(buffer, tensor) for buffer, tensor in lifted)
        for call in calls:
            call.args = (*call.args, *outer)


def _lift_plan_buffers(body: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Turn the body's plan-buffer reads into trailing placeholders (same names); return
    ``(name, tensor)`` of each, in placeholder order, and drop them from the body."""
    reads = [n for n in body.graph.nodes if is_plan_buffer(n)]
    if not reads:
        return []
    last = [n for n in body.graph.nodes if n.op == "placeholder"][-1]
    lifted = []
    for read in reads:
        name = str(read.target)
        with body.graph.inserting_after(last):
            placeholder = body.graph.placeholder(name)
        placeholder.meta.update(read.meta)
        read.replace_all_uses_with(placeholder)
        body.graph.erase_node(read)
        lifted.append((name, getattr(body, name)))
        delattr(body, name)
        last = placeholder
    return lifted
