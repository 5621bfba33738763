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
from li_compile.passes.sampler_match import Step, TransformerSite, input_name, is_parameter, value, written_base
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
        return (running().denoise.step(self, lambda: self.key(args), latents, compute,
                                       timestep=args[self.site.timestep_index]),)


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
                 failed: Callable[[str], None]) -> None:
        """``failed(reason)``: told when a piece's inner compile fails (the piece then runs as written)."""
        self.steps = len(steps)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        latent = _input_of(steps[0].x)  # the chunk's noise: the latent entering step 0 comes from it
        self.key = CallKey(gm, {placeholders.index(latent)} if latent is not None else set())
        self.current_key: Callable[[], Hashable] = lambda: None
        check_ordering(gm, steps)
        partition = _partitions(gm, steps)
        self.split = split_module(gm, None, lambda node: partition[node])
        _in_partition_order(self.split)
        for name, piece in list(self.split.named_children()):
            number = int(name.rsplit("_", 1)[1])
            lazy = _LazyCompiled(piece, inner, mode, failed)
            if number % 2:
                index = number // 2
                placeholders = [n.name for n in piece.graph.nodes if n.op == "placeholder"]
                if steps[index].x.name not in placeholders:
                    raise ValueError(f"step {index}'s latent {steps[index].x.name} does not enter its model call "
                                     "as it is (the call reads only values computed from it)")
                lazy = _CachedStep(self, index, lazy, placeholders.index(steps[index].x.name))
            setattr(self.split, name, lazy)

    def __call__(self, *args):
        self.current_key = lambda: self.key(args)
        return self.split(*args)


_RANDOM = {"normal", "normal_", "bernoulli", "bernoulli_", "multinomial", "poisson", "exponential_", "cauchy_",
           "geometric_", "log_normal_", "uniform_", "random_", "rrelu", "rrelu_", "gumbel_softmax"}


def _draws(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (it advances the generator): ``torch.rand*``, the
    distributions' samplers, dropout and its kin."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.startswith("rand") or name in _RANDOM or "dropout" in name


def check_ordering(gm: fx.GraphModule, steps: list[Step]) -> None:
    """Raise ValueError where serving a step's model calls, or running the split's partitions, could
    change what the chunk computes: a random draw anywhere (a served step skips the draws in its
    calls and shifts every later one), an impure call, or an in-place write other than one inside a
    step's model calls to a tensor made and read only there (the split may run it before or after the
    reads it stood between; a hit skips it)."""
    piece_of = {node: i for i, step in enumerate(steps) for node in step.piece}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if _draws(node) or node.is_impure():
            raise ValueError(f"{node.name} draws random numbers or has effects: a served step would skip it or "
                             "move the draws after it")
        base = written_base(node)
        if base is None:
            continue
        piece = piece_of.get(node)
        readers = [*base.users, *node.users]
        if piece is None or piece_of.get(base) != piece or any(piece_of.get(r) != piece for r in readers):
            raise ValueError(f"{node.name} writes {base.name} in place outside one step's model calls: the split "
                             "could run it before or after the reads it stands between, and a hit would skip it")


def _in_partition_order(split: fx.GraphModule) -> None:
    """Call ``split``'s partitions in the order of their numbers (a valid order: a partition reads
    only lower ones), not torch's dependency sort: the steps' model pieces then run in step order even
    where a step's latent does not depend on the step before."""
    graph = split.graph
    output = next(n for n in graph.nodes if n.op == "output")
    calls = sorted((n for n in graph.nodes if n.op == "call_module"), key=lambda n: int(str(n.target).rsplit("_", 1)[1]))
    for call in calls:
        output.prepend(call)
        for unpacked in [u for u in call.users if u.op == "call_function"]:
            output.prepend(unpacked)
    graph.lint()
    split.recompile()


def _input_of(node: fx.Node) -> fx.Node | None:
    """The graph input ``node`` is taken from, or None: through single-input ops (``noise[0]``, a
    view) and ops whose other inputs are single numbers (``noise * sigmas[0]``: a scale, which stays
    in the cache key). Any other tensor mixed in (``noise + cond``, ``cond + noise[:, :, :1]``) gives
    None: which input is the noise is then not known, and every input stays in the key."""
    while node.op != "placeholder":
        if node.op not in ("call_function", "call_method"):
            return None
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            full = [i for i in inputs if _numel(i) == _numel(node)]
            if _numel(node) is None or len(full) != 1 or any(_numel(i) != 1 for i in inputs if i is not full[0]):
                return None
            inputs = full
        node = inputs[0]
    return node


def _numel(node: fx.Node) -> int | None:
    """Elements of the tensor ``node`` traced to (Dynamo's example value), or None (not a tensor, or
    a symbolic size)."""
    example = value(node)
    return example.numel() if isinstance(example, torch.Tensor) and isinstance(example.numel(), int) else None


def _partitions(gm: fx.GraphModule, steps: list[Step]) -> dict[fx.Node, int]:
    """Partition numbers for ``split_module``: ``2i + 1`` for the model piece of step ``i``; the rest
    after the last model piece it depends on (``2i + 2``), or 0 before any. Partitions read only
    lower ones and run in their numbers' order (``_in_partition_order``); ``check_ordering`` refused
    every node whose place among the others could change what the chunk computes."""
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
