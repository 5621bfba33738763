"""Regional compilation: a graph of N repeated transformer blocks compiles one block, not N.

Dynamo hands the backend the whole model as one graph, every block unrolled. Inductor's time grows
with that graph: a 54-block DiT at four context capacities takes many minutes to warm up. Here the
graph is cut at its repeated blocks, found by the module each node was traced in
(``node.meta["nn_module_stack"]``: the outermost module path ending in an index, such as
``blocks.3``, one of ``MIN_BLOCKS`` or more of one class in one container: the ``Linear`` layers
of an ``nn.Sequential`` are no blocks). Each block, and each stretch of top-level code between blocks, becomes one region.
Regions whose graphs are the same (same ops on the same constants, with weights as inputs) and whose
inputs have the same shapes, strides, dtypes and devices share ONE compiled function: the first
such region compiles it on its first call (real inputs), the others reuse it. The rewrites of the
passes are already in the graph, so the plans and the denoising cache act in every block as before.

Inductor loses only its fusion across block boundaries. A graph with fewer than ``MIN_BLOCKS``
indexed blocks compiles whole (cutting it would compile more pieces than it shares), as does one
whose regions cannot be cut (``compile_regions`` says why).
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.passes.split_module import split_module

from li_compile.inner import InnerCompiler, compile_or_as_written

log = logging.getLogger(__name__)

_INDEXED = re.compile(r"(?:\.\d+|\[\d+\])$")  # "blocks.3" or "blocks[3]": an entry of a module list
MIN_BLOCKS = 4  # fewer repeated blocks compile whole: 3 regions (before, one block, after) cost more than 1-2 blocks
REGION_COUNTER = "li_compile.regions"  # torch's compile counters: [REGION_COUNTER]["compiled"] regions compiled


@dataclass(frozen=True)
class Regions:
    """How a graph was cut: ``blocks`` indexed blocks, ``regions`` pieces in all, ``None`` reason when
    it was cut (else why it compiles whole)."""

    blocks: int
    regions: int
    reason: str | None = None


def block_paths(gm: fx.GraphModule) -> set[str]:
    """The module paths of ``gm``'s repeated blocks: indexed modules (``blocks.3``) of one container
    and one class, ``MIN_BLOCKS`` or more of them (a stack of transformer blocks, whatever they hold);
    a few indexed layers (an ``nn.Sequential``'s ``Linear``, ``SiLU``, ``Linear`` of a timestep
    embedding) are none."""
    kinds = {path: kind for n in gm.graph.nodes for path, kind in (n.meta.get("nn_module_stack") or {}).values()}
    groups: dict[tuple[str, str], list[str]] = {}
    for path, kind in kinds.items():
        index = _INDEXED.search(path)
        if index:
            groups.setdefault((path[: index.start()], str(kind)), []).append(path)
    return {p for members in groups.values() if len(members) >= MIN_BLOCKS for p in members}


def block_of(node: fx.Node, blocks: set[str]) -> str | None:
    """The path of the outermost of ``blocks`` (``blocks.3``) ``node`` was traced in, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((path for path, _ in stack.values() if path in blocks), None)


def region_numbers(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], int]:
    """Region number per non-placeholder node (consecutive runs of one block, or of top-level code, in
    graph order) and the number of distinct blocks (``block_paths``). A node traced with no module
    stack (one a pass inserted) belongs to the block around it when the nodes before and after it agree."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    blocks = block_paths(gm)
    owners = [block_of(n, blocks) if n.meta.get("nn_module_stack") else ... for n in nodes]
    for i, owner in enumerate(owners):
        if owner is ...:
            before = next((o for o in reversed(owners[:i]) if o is not ...), None)
            after = next((o for o in owners[i + 1:] if o is not ...), None)
            owners[i] = before if before == after else None
    numbers: dict[fx.Node, int] = {}
    number, previous = -1, object()
    for node, owner in zip(nodes, owners):
        if owner != previous:
            number, previous = number + 1, owner
        numbers[node] = number
    return numbers, len({o for o in owners if o is not None})


def compile_regions(inner: InnerCompiler, record: Callable[[Regions], None] = lambda regions: None,
                    failed: Callable[[str], None] = lambda reason: None) -> InnerCompiler:
    """``inner`` made regional: ``compile(gm, example_inputs, mode)`` cuts ``gm`` at its repeated
    blocks and returns a callable that runs the regions in order, each distinct region compiled by
    ``inner`` once (on its first call). ``record`` is told how each graph with ``MIN_BLOCKS`` or more
    blocks was cut, or why it was not; ``failed`` why a region runs as written (``compile_or_as_written``)."""

    def compile(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: Any) -> Callable:
        numbers, blocks = region_numbers(gm)
        if blocks < MIN_BLOCKS:  # too few to share: the regions' own compiles would cost more
            return inner(gm, example_inputs, mode)
        reason = None
        if any(_symbolic(x) for x in example_inputs):
            reason = "dynamic shapes"
        else:
            try:
                split = split_module(gm, None, lambda node: numbers[node], keep_original_order=True)
            except Exception as exc:  # noqa: BLE001 - a cut we cannot make costs compile time, never correctness
                reason = f"could not cut the graph ({type(exc).__name__}: {exc})"
                log.warning("light_interaction: %s; compiled whole", reason)
        if reason is not None:
            record(Regions(blocks, 1, reason))
            return inner(gm, example_inputs, mode)
        shared: dict[Hashable, Callable] = {}
        structures: dict[Hashable, int] = {}
        names = [name for name, _ in split.named_children()]
        for name in names:
            setattr(split, name, _Region(getattr(split, name), inner, mode, shared, structures, failed))
        record(Regions(blocks, len(names)))
        return split  # its forward is FX code: each value is dropped after its last use

    return compile


class _Region(torch.nn.Module):
    """One region: compiled on its first call for its inputs' layout, or the compiled function of an
    identical region with the same input layout reused (``shared``: one per cut graph, keyed by the
    region's structure number in ``structures`` and its inputs' layout; numbering the structure once
    keeps each call from hashing the whole graph's node list)."""

    def __init__(self, piece: fx.GraphModule, inner: InnerCompiler, mode: Any,
                 shared: dict[Hashable, Callable], structures: dict[Hashable, int],
                 failed: Callable[[str], None]) -> None:
        super().__init__()
        output = piece.graph.find_nodes(op="output")[0]
        self.single = not isinstance(output.args[0], (tuple, list))
        if self.single:  # inner compilers return a sequence of outputs: make the one value a 1-tuple
            output.args = ((output.args[0],),)
            piece.recompile()
        self.piece, self.inner, self.mode, self.shared, self.failed = piece, inner, mode, shared, failed
        self.structure = structures.setdefault(structure_key(piece), len(structures))

    def forward(self, *args: Any) -> Any:
        key = (self.structure, inputs_key(args))
        compiled = self.shared.get(key)
        if compiled is None:
            compiled = self.shared[key] = compile_or_as_written(self.inner, self.piece, args, self.mode, "a region",
                                                                     self.failed)
            counters[REGION_COUNTER]["compiled"] += 1
        out = compiled(*args)
        return out[0] if self.single else out


def structure_key(piece: fx.GraphModule) -> Hashable:
    """What a region computes, independent of its node names: per node its op, target and arguments
    (other nodes by position; tensors, modules and other objects by identity, so two regions that
    read different constants never share code). Weights that are graph inputs do not enter it."""
    position: dict[fx.Node, int] = {}
    key = []
    for i, node in enumerate(piece.graph.nodes):
        position[node] = i
        if node.op == "get_attr":
            target: Any = ("attr", id(operator.attrgetter(node.target)(piece)))
        elif node.op == "call_module":
            target = ("module", id(piece.get_submodule(node.target)))
        elif node.op in ("placeholder", "output"):
            target = None
        else:
            target = node.target
        key.append((node.op, target, _frozen(node.args, position), _frozen(node.kwargs, position)))
    return tuple(key)


def inputs_key(args: Sequence[Any]) -> Hashable:
    """What compiled code may be specialised on in a region's inputs: per tensor its shape, strides,
    dtype, device, ``requires_grad`` and which other inputs share its storage; other values as they
    are. (Not alignment: Inductor copies an input that is less aligned than the one it compiled for.)"""
    storages: dict[int, int] = {}
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            storage = storages.setdefault(a.untyped_storage().data_ptr(), len(storages))
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad, storage))
        else:
            key.append((type(a), _frozen(a, {})))
    return tuple(key)


def _frozen(value: Any, position: dict[fx.Node, int]) -> Hashable:
    """A hashable, name-free image of a node argument."""
    if isinstance(value, fx.Node):
        return ("node", position[value])
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_frozen(v, position) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v, position)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _frozen((value.start, value.stop, value.step), position))
    if isinstance(value, float):
        return ("float", repr(value))  # exact, and -0.0 / nan keep their own keys
    if value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device, torch.layout,
                                           torch.memory_format)):
        return (type(value).__name__, value)
    return ("object", id(value))


def _symbolic(value: Any) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride()))


def regional_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """A Dynamo backend: plain Inductor, compiled regionally and nothing rewritten. The dense
    baseline compiled the way light_interaction compiles: ``torch.compile(model, backend=regional_inductor)``."""
    from li_compile.inner import compile_inductor

    return compile_regions(compile_inductor)(gm, example_inputs, None)
