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

import logging
from typing import Callable, Hashable, Sequence

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from li_compile.cache_key import argument_values
from li_compile.inner import InnerCompiler, compile_or_as_written
from li_compile.passes.sampler_match import Step, TransformerSite, input_name, is_parameter
from li_compile.running import running, running_arguments

log = logging.getLogger("li_compile")



class CallKey:
    """The cache key of one call of a compiled graph (``li_compile.cache_key``): the identity and
    version of every weight tensor it uses (its parameter/buffer inputs and the parameters the graph
    holds), the digest of its conditioning inputs (every other input except the noisy latent(s)
    ``latents`` (input positions), the timestep(s) and the inputs the running model's accelerator was
    told vary on a revisit, ``Accelerator.configure(revisit_inputs=...)``), and the Python values of
    the user's call (``running_arguments``, but those same names): a float, int, bool or string
    argument such as a guidance scale is a constant Dynamo bakes into the graph, not an input."""

    def __init__(self, gm: fx.GraphModule, excluded: set[int]) -> None:
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weights = [i for i, n in enumerate(inputs) if is_parameter(n)]
        self.held = [t for _, t in gm.named_parameters()]  # not buffers: plan slots live there
        self.names = {i: input_name(n) for i, n in enumerate(inputs) if i not in excluded and i not in self.weights}
        self.excluded_names = frozenset(input_name(inputs[i]) for i in excluded)

    def __call__(self, args: Sequence) -> Hashable:
        model = running()
        weights = [args[i] for i in self.weights if isinstance(args[i], torch.Tensor)] + self.held
        conditioning = [args[i] for i, name in self.names.items() if name not in model.revisit_inputs]
        values = argument_values(running_arguments(), self.excluded_names | model.revisit_inputs)
        return values, model.cache_key(weights, conditioning)


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

    def __init__(self, piece: fx.GraphModule, inner: InnerCompiler, mode: str | None,
                 failed: Callable[[str], None]) -> None:
        super().__init__()
        self.piece, self.inner, self.mode, self.failed = piece, inner, mode, failed
        self.compiled: Callable | None = None

    def forward(self, *args):
        if self.compiled is None:
            self.compiled = compile_or_as_written(self.inner, self.piece, args, self.mode, "a chunk piece",
                                                  self.failed)
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

    def __init__(self, gm: fx.GraphModule, steps: list[Step], inner: InnerCompiler, mode: str | None,
                 failed: Callable[[str], None] = lambda reason: None) -> None:
        """``failed(reason)``: told when a piece's inner compile fails (the piece then runs as written)."""
        self.steps = len(steps)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        latent = _input_of(steps[0].x)  # the chunk's noise: the latent entering step 0 comes from it
        self.key = CallKey(gm, {placeholders.index(latent)} if latent is not None else set())
        self.current_key: Callable[[], Hashable] = lambda: None
        partition = _partitions(gm, steps)
        self.split = split_module(gm, None, lambda node: partition[node])
        _in_partition_order(self.split)
        for name, piece in list(self.split.named_children()):
            number = int(name.rsplit("_", 1)[1])
            lazy = _LazyCompiled(piece, inner, mode, failed)
            if number % 2:
                index = number // 2
                placeholders = [n.name for n in piece.graph.nodes if n.op == "placeholder"]
                lazy = _CachedStep(self, index, lazy, placeholders.index(steps[index].x.name))
            setattr(self.split, name, lazy)

    def __call__(self, *args):
        self.current_key = lambda: self.key(args)
        return self.split(*args)


_RANDOM = ("rand", "normal", "bernoulli", "multinomial", "uniform", "poisson", "exponential", "cauchy", "geometric",
           "dropout", "rrelu", "gumbel")


def _ordered(node: fx.Node) -> bool:
    """Whether ``node`` must keep its place among the graph's calls: an impure call, a random draw
    (it advances the generator), or an in-place write (``add_``, ``out=``)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.is_impure() or any(word in name for word in _RANDOM) or name.endswith("_") or "out" in node.kwargs


def _in_partition_order(split: fx.GraphModule) -> None:
    """Call ``split``'s partitions in the order of their numbers (a valid order: a partition reads
    only lower ones), not torch's dependency sort, which may run one that nothing later reads (a
    draw before the loop, a state written before it) after every piece."""
    graph = split.graph
    output = next(n for n in graph.nodes if n.op == "output")
    calls = sorted((n for n in graph.nodes if n.op == "call_module"), key=lambda n: int(str(n.target).rsplit("_", 1)[1]))
    for call in calls:
        output.prepend(call)
        for unpacked in [u for u in call.users if u.op == "call_function"]:
            output.prepend(unpacked)
    graph.lint()
    split.recompile()


def _computed_from(x: fx.Node, piece: set[fx.Node] | list[fx.Node]) -> list[fx.Node]:
    """The nodes of ``piece`` computed from ``x`` (the step's latent), directly or not: the model
    call proper, without what it only reads (a timestep embedding hoisted before the loop)."""
    members, found, todo = set(piece), [], list(x.users)
    seen = set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in members:
            found.append(node)
        todo.extend(node.users)
    return found


def _input_of(node: fx.Node) -> fx.Node | None:
    """The graph input ``node`` is taken from by single-input ops (``noise[0]``, a view), or None."""
    while node.op != "placeholder":
        if node.op not in ("call_function", "call_method") or len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    return node


def _partitions(gm: fx.GraphModule, steps: list[Step]) -> dict[fx.Node, int]:
    """Partition numbers for ``split_module``: ``2i + 1`` for the model piece of step ``i``; the rest
    after the last model piece it depends on (``2i + 2``), and no earlier than where it stands in the
    graph: ``2k`` after ``k`` whole pieces, so a random draw or an in-place write, and what reads
    state such a write changed, keeps its place between the steps. One that stands among the nodes
    of a step's model calls (from the first computed from the step's latent to its last) cannot be
    kept there: ValueError (the chunk compiles whole, uncached). Partitions read only lower ones and
    run in their numbers' order (``_in_partition_order``)."""
    piece_of = {node: i for i, step in enumerate(steps) for node in step.piece}
    nodes = list(gm.graph.nodes)
    at = {node: position for position, node in enumerate(nodes)}
    last = {}
    for node in nodes:
        if node in piece_of:
            last[piece_of[node]] = at[node]
    first = {i: min((at[n] for n in _computed_from(step.x, step.piece)), default=last.get(i, 0))
             for i, step in enumerate(steps)}
    partition: dict[fx.Node, int] = {}
    for node in nodes:
        if node in piece_of:
            partition[node] = 2 * piece_of[node] + 1
            continue
        after = [
            2 * piece_of[i] + 2 if i in piece_of else partition[i]
            for i in node.all_input_nodes
        ]
        if node.op in ("placeholder", "get_attr", "output"):
            partition[node] = max(after, default=0)
            continue
        done = sum(at[node] > end for end in last.values())  # pieces wholly before this node
        if _ordered(node) and done in first and first[done] < at[node]:
            raise ValueError(f"{node.name} (a random draw or an in-place write) stands among the model calls of "
                             f"step {done}: skipping those calls on a hit would skip or move it")
        partition[node] = max([*after, 2 * done])
    for node, number in partition.items():
        earlier = [partition[i] for i in node.all_input_nodes]
        if node in piece_of and any(p > number for p in earlier):
            raise ValueError(f"model piece node {node.name} needs a later partition: steps are not ordered")
    return partition
