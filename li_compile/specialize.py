"""Graphs Dynamo traced with symbolic shapes, compiled static once per concrete shape.

With ``dynamic=None`` (torch.compile's default) Dynamo traces a second context capacity as a graph
whose sizes are symbols (``s0``, ...), and ``dynamic=True`` does so from the first call. The plan
slots and the kernel need static shapes, so such a graph is not compiled as it is: at each call,
the concrete values of its symbols (its int inputs) and the sizes of its tensor inputs pick a
static copy of the graph, made on the first call with those shapes (``specialize``: every node's
example value re-propagated with fake tensors of the call's inputs, every size computation folded
into a constant) and compiled as a graph Dynamo had traced static. One Dynamo trace then serves
every capacity bucket; each bucket still gets its own compile, as with ``dynamic=False``.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from li_compile.passes.graph_copy import copy_module

SPECIALIZE_COUNTER = "li_compile.specialize"  # torch's compile counters: [SPECIALIZE_COUNTER]["compiled"]

# compile_static(gm, inputs, reason): ``reason`` None for a static copy, else why ``gm`` stays symbolic
StaticCompiler = Callable[[fx.GraphModule, Sequence[Any], "str | None"], Callable]


def is_symbolic(example_inputs: Sequence[Any]) -> bool:
    """Whether a graph's example inputs hold a symbolic int or a tensor of symbolic size."""
    return any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) or _symbolic_size(x) for x in example_inputs)


def _symbolic_size(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not all(isinstance(s, int) for s in x.shape)


class ShapeSpecialized:
    """A symbolic graph that compiles, per concrete shape of its inputs, a static copy with
    ``compile_static(static_gm, inputs, None)`` on the first call of that shape, and runs it. A graph
    that cannot be specialized (a data-dependent value, such as ``.item()``) is handed over once as it
    is, ``compile_static(gm, inputs, reason)``, for every shape: its sites stay as written, with the
    reason (the backend runs it eagerly: an inner compiler handed the first call's concrete inputs
    would specialize to them).
    So does every shape past Dynamo's ``recompile_limit`` distinct ones (each int input's value is
    part of a shape: an int that is not a size would otherwise compile once per value)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], compile_static: StaticCompiler) -> None:
        # a copy now: once the backend returns, Dynamo drops metadata the passes read (each input's source)
        self.gm = copy_module(gm)
        self.compile_static = compile_static
        # what picks the static copy: the values of the non-tensor inputs (the symbols) and the sizes of
        # the tensors whose size is symbolic, found once here rather than per call over every weight
        self.numbers = [i for i, x in enumerate(example_inputs) if not isinstance(x, torch.Tensor)]
        self.sized = [i for i, x in enumerate(example_inputs) if _symbolic_size(x)]
        self.compiled: dict[tuple, Callable] = {}
        self.symbolic: Callable | None = None  # the graph compiled as it is, once it failed to specialize

    def __call__(self, *args: Any) -> Any:
        key = (tuple(args[i] for i in self.numbers), tuple(args[i].shape for i in self.sized))
        compiled = self.compiled.get(key)
        if compiled is not None:
            return compiled(*args)
        if self.symbolic is not None:
            return self.symbolic(*args)
        limit = torch._dynamo.config.recompile_limit
        if len(self.compiled) >= limit:  # an int that is no size (a step or frame counter) would compile per value
            values = sorted({tuple(k[0]) for k in self.compiled})[:4]
            return self._as_traced(args, f"symbolic graph met more than {limit} distinct shapes or int inputs "
                                         f"(int inputs {values}, ...; Dynamo's recompile_limit); new ones run it "
                                         "as traced, eagerly, their attention left as written. Fix: "
                                         "torch.compile(..., dynamic=False), or pass a changing number as a tensor")
        try:
            static = specialize(self.gm, args)
        except Exception as exc:  # noqa: BLE001 - any failure: the graph as Dynamo traced it, never a crash
            return self._as_traced(args, f"symbolic graph not specialized ({type(exc).__name__}: {str(exc)[:200]}); "
                                         "run as traced, eagerly, its attention left as written. Fix: "
                                         "torch.compile(..., dynamic=False)")
        compiled = self.compiled[key] = self.compile_static(static, args, None)
        counters[SPECIALIZE_COUNTER]["compiled"] += 1
        return compiled(*args)

    def _as_traced(self, args: Sequence[Any], reason: str) -> Any:
        """Hand the graph over as Dynamo traced it (once, with ``reason``) and run it on ``args``."""
        self.symbolic = self.compile_static(self.gm, args, reason)
        return self.symbolic(*args)


def specialize(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    """A static copy of ``gm`` for the concrete ``args``: same nodes and metadata, every
    ``example_value`` a fake tensor of static shape, and every node whose value is a number (or a
    tuple of numbers, such as a size) folded into its users as a constant. Int inputs stay
    placeholders (the graph's signature is unchanged), unused."""
    placeholders = sum(n.op == "placeholder" for n in gm.graph.nodes)
    if len(args) != placeholders:
        raise ValueError(f"specialize: {len(args)} inputs for a graph of {placeholders} placeholders")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}  # old node -> new node, or the constant it folded into
    values: dict[fx.Node, Any] = {}  # old node -> its value for ``args`` (fake tensors)
    inputs = iter(args)
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
            continue
        if node.op == "placeholder":
            value = _fake(mode, next(inputs))
        else:
            value = _run(gm, node, fx.node.map_arg((node.args, node.kwargs), values.__getitem__), mode)
        values[node] = value
        if node.op != "placeholder" and _is_constant(value) and not _has_effects(node):
            env[node] = value
            continue
        new = graph.create_node(node.op, node.target, *fx.node.map_arg((node.args, node.kwargs), env.__getitem__),
                                name=node.name, type_expr=node.type)
        new.meta = {**node.meta, "example_value": value}
        # an int input stays a placeholder, but its users read the constant (a size inside a flattened
        # block mask, say); a call kept for its effects (a vmap level) is read from its node
        env[node] = value if node.op == "placeholder" and _is_constant(value) else new
    static = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    static.meta = dict(getattr(gm, "meta", {}))
    return static


def _fake(mode: FakeTensorMode, value: Any) -> Any:
    return mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value


def _run(gm: fx.GraphModule, node: fx.Node, inputs: tuple[tuple, dict], mode: FakeTensorMode) -> Any:
    """``node``'s value on fake ``inputs`` (args, kwargs)."""
    args, kwargs = inputs
    if node.op == "get_attr":
        return _fake(mode, operator.attrgetter(str(node.target))(gm))
    with mode:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
    raise ValueError(f"specialize: node {node.name} has op {node.op!r}")


def _has_effects(node: fx.Node) -> bool:
    """Whether ``node`` must run though its value is a number: FX's impure calls, and functorch's
    transforms' bookkeeping (``torch.vmap`` enters and leaves a level through calls that return it)."""
    module = getattr(node.target, "__module__", "") or ""
    return node.is_impure() or module.startswith(("torch._functorch", "torch._C._functorch"))


def _is_constant(value: Any) -> bool:
    """A plain number, or a (possibly nested) tuple/list of them: what a size computation yields."""
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (tuple, list)) and all(_is_constant(v) for v in value)
