"""Host-side runners that put the denoising cache between Dynamo and the compiled code.

The cache decision (serve a stored output or run the model) is made on the host by the model's
``Accelerator.denoise`` (a ``DenoiseRuntime``), never inside a traced graph, so hits and misses change
nothing Dynamo guards on: the model compiles once.

- ``ModelCallRunner`` (the graph is one denoiser call): wraps the inner compiler's callable; each
  call is one step; on a hit it returns the stored output without running the graph.
- ``ChunkRunner`` (the graph is a whole chunk with its denoising loop unrolled): the graph is split
  (``torch.fx.passes.split_module``) into each step's model piece and the rest (updates, noise,
  anything shared between steps); every piece is compiled by the inner compiler on its first call;
  a model piece on a cached step is not run.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Callable, Hashable, Sequence

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from li_compile.inner import InnerCompiler, compile_or_as_written
from li_compile.passes.sampler_match import Step, TransformerSite, input_name, is_parameter
from li_compile.running import running

log = logging.getLogger("li_compile")



class CallKey:
    """The cache key of one call of a compiled graph (``li_compile.cache_key``): the graph's
    ``graph_signature`` (the values Dynamo baked into it), the identity and version of every weight
    tensor it uses (its parameter/buffer inputs and the parameters the graph holds), and the digest
    of its conditioning inputs: every other input except the noisy latent(s) ``latents`` (input
    positions), the timestep(s) and the inputs the running model's accelerator was told vary on a
    revisit (``Accelerator.configure(revisit_inputs=...)``)."""

    def __init__(self, gm: fx.GraphModule, excluded: set[int]) -> None:
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weights = [i for i, n in enumerate(inputs) if is_parameter(n)]
        self.held = [t for _, t in gm.named_parameters()]  # not buffers: plan slots live there
        self.names = {i: input_name(n) for i, n in enumerate(inputs) if i not in excluded and i not in self.weights}
        self.gm = gm
        self.signatures: dict[frozenset[str], str] = {}  # by the running model's revisit_inputs

    def __call__(self, args: Sequence) -> Hashable:
        model = running()
        weights = [args[i] for i in self.weights if isinstance(args[i], torch.Tensor)] + self.held
        conditioning = [args[i] for i, name in self.names.items() if name not in model.revisit_inputs]
        if model.revisit_inputs not in self.signatures:
            self.signatures[model.revisit_inputs] = graph_signature(self.gm, model.revisit_inputs)
        return self.signatures[model.revisit_inputs], model.cache_key(weights, conditioning)


# Calls whose integer arguments are sizes, dims, counts or bounds, and calls that make position or
# size tensors: where the graphs of one model at several capacity buckets differ (``graph_signature``).
SHAPE_CALLS = frozenset({
    "view", "reshape", "expand", "repeat", "tile", "narrow", "split", "split_with_sizes", "chunk", "unflatten",
    "flatten", "size", "arange", "linspace", "zeros", "ones", "empty", "full", "new_zeros", "new_ones",
    "new_empty", "new_full", "rand", "randn", "pad", "repeat_interleave",
})
POSITION_SOURCES = frozenset({"arange", "linspace", "size", "zeros", "ones", "empty", "full"})


def graph_signature(gm: fx.GraphModule, revisit: frozenset[str] = frozenset()) -> str:
    """A digest of what ``gm`` computes apart from its inputs: every node's operation and the values
    Dynamo baked into its arguments (a Python float, bool, string or integer argument of the model is
    a constant of its graph, and another value is another graph). Left out, so that the graphs of one
    model that the cache's approximation allows to share entries (another context) get one digest:

    - integers that are sizes or positions: in the arguments of ``SHAPE_CALLS`` and of the li ops
      (capacities, block sizes), in slices, and in arithmetic on position tensors
      (``POSITION_SOURCES`` and what is computed from them alone, e.g. ``arange(n) -
      context_frames``): the graphs of several capacity buckets differ there, and in their plan
      slots' names;
    - the inputs named in ``revisit`` (``Accelerator.configure(revisit_inputs=...)``: camera- and
      context-derived) and what is computed from them alone, which arguments name as None: a
      context's validity mask, which a full context's graph drops, is one."""
    index: dict[fx.Node, int] = {}
    positions: set[fx.Node] = set()
    dropped: set[fx.Node] = set()
    described = []
    for node in gm.graph.nodes:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        inputs = node.all_input_nodes
        computed = node.op in ("call_function", "call_method") and bool(inputs)
        if (node.op == "placeholder" and input_name(node) in revisit) or (
                computed and any(n in dropped for n in inputs) and all(n in dropped or n in positions for n in inputs)):
            dropped.add(node)
            continue
        index[node] = len(index)
        if name in POSITION_SOURCES or (computed and all(n in positions for n in inputs)):
            positions.add(node)
        shaped = name in SHAPE_CALLS or str(node.target).startswith("li.") or any(n in positions for n in inputs)
        target = _qualified(node.target) if node.op == "call_function" else re.sub(r"li_plan_slot\d+", "li_plan_slot", str(node.target))
        described.append((node.op, target, _baked(node.args, shaped, index), _baked(node.kwargs, shaped, index)))
    return hashlib.sha256(repr(described).encode()).hexdigest()


def _qualified(target: object) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', getattr(target, '__name__', target))}"


def _baked(value: object, shaped: bool, index: dict[fx.Node, int]) -> object:
    """``value`` (a node's arguments) as ``graph_signature`` describes it: nodes by position among
    those it keeps (a node it left out as None), integers as "int" where ``shaped`` or inside a
    slice, other values by ``repr``."""
    if isinstance(value, fx.Node):
        return ("node", index[value]) if value in index else repr(None)
    if isinstance(value, (list, tuple)):
        return tuple(_baked(v, shaped, index) for v in value)
    if isinstance(value, dict):
        return tuple((k, _baked(v, shaped, index)) for k, v in value.items())
    if isinstance(value, slice):
        return ("slice", *(_baked(v, True, index) for v in (value.start, value.stop, value.step)))
    if isinstance(value, int) and not isinstance(value, bool) and shaped:
        return "int"
    return repr(value)


class ModelCallRunner:
    """A compiled denoiser call behind the denoising cache (one call = one step)."""

    def __init__(self, compiled: Callable, gm: fx.GraphModule, site: TransformerSite) -> None:
        self.compiled, self.site = compiled, site
        self.key = CallKey(gm, {site.latent_index, site.timestep_index})

    def __call__(self, *args):
        def compute() -> torch.Tensor:
            (out,) = self.compiled(*args)
            return out

        latents = args[self.site.latent_index]
        return (running().denoise.step(self, lambda: self.key(args), latents, compute),)


class _LazyCompiled(torch.nn.Module):
    """A piece of a split graph, compiled by the inner compiler on its first call (real inputs)."""

    def __init__(self, piece: fx.GraphModule, inner: InnerCompiler, mode: str | None) -> None:
        super().__init__()
        self.piece, self.inner, self.mode = piece, inner, mode
        self.compiled: Callable | None = None

    def forward(self, *args):
        if self.compiled is None:
            self.compiled = compile_or_as_written(self.inner, self.piece, args, self.mode, "a chunk piece")
        return self.compiled(*args)


class _CachedStep(torch.nn.Module):
    """The model piece of step ``index``: served from the cache on a hit, else run (and stored)."""

    def __init__(self, runner: "ChunkRunner", index: int, piece: _LazyCompiled, latent_position: int) -> None:
        super().__init__()
        self.index, self.piece, self.latent_position = index, piece, latent_position
        self._runner = [runner]  # a list: not a submodule

    def forward(self, *args):
        runner = self._runner[0]
        return running().denoise.step(
            runner, runner.current_key, args[self.latent_position], lambda: self.piece(*args),
            steps=runner.steps, step=self.index,
        )


class ChunkRunner:
    """A compiled chunk generation (unrolled denoising loop) whose model pieces go through the cache."""

    def __init__(self, gm: fx.GraphModule, steps: list[Step], inner: InnerCompiler, mode: str | None) -> None:
        self.steps = len(steps)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        latent = _input_of(steps[0].x)  # the chunk's noise: the latent entering step 0 comes from it
        self.key = CallKey(gm, {placeholders.index(latent)} if latent is not None else set())
        self.current_key: Callable[[], Hashable] = lambda: None
        partition = _partitions(gm, steps)
        self.split = split_module(gm, None, lambda node: partition[node], keep_original_order=True)
        for name, piece in list(self.split.named_children()):
            number = int(name.rsplit("_", 1)[1])
            lazy = _LazyCompiled(piece, inner, mode)
            if number % 2:
                index = number // 2
                placeholders = [n.name for n in piece.graph.nodes if n.op == "placeholder"]
                lazy = _CachedStep(self, index, lazy, placeholders.index(steps[index].x.name))
            setattr(self.split, name, lazy)

    def __call__(self, *args):
        self.current_key = lambda: self.key(args)
        return self.split(*args)


def _input_of(node: fx.Node) -> fx.Node | None:
    """The graph input ``node`` is taken from by single-input ops (``noise[0]``, a view), or None."""
    while node.op != "placeholder":
        if node.op not in ("call_function", "call_method") or len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    return node


def _partitions(gm: fx.GraphModule, steps: list[Step]) -> dict[fx.Node, int]:
    """Partition numbers for ``split_module``: ``2i + 1`` for the model piece of step ``i``; the rest
    after the last model piece it depends on (``2i + 2``), or 0 before any. Pieces depend only on
    earlier rest partitions, so the split keeps the graph's order."""
    piece_of = {node: i for i, step in enumerate(steps) for node in step.piece}
    partition: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node in piece_of:
            partition[node] = 2 * piece_of[node] + 1
            continue
        after = [
            2 * piece_of[i] + 2 if i in piece_of else partition[i]
            for i in node.all_input_nodes
        ]
        partition[node] = max(after, default=0)
    for node, number in partition.items():
        earlier = [partition[i] for i in node.all_input_nodes]
        if node in piece_of and any(p > number for p in earlier):
            raise ValueError(f"model piece node {node.name} needs a later partition: steps are not ordered")
    return partition
