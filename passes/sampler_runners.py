"""Host-side runners that put the denoising cache between Dynamo and the compiled code.

The cache decision (serve a stored output or run the model) is made on the host by
``li_compile.denoise_runtime.DENOISE``, never inside a traced graph, so hits and misses change
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
from typing import Callable, Sequence

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from li_compile.denoise_runtime import DENOISE
from li_compile.options import CacheOptions
from li_compile.passes.sampler_match import Step, TransformerSite, is_parameter

log = logging.getLogger("li_compile")

InnerCompiler = Callable[[fx.GraphModule, Sequence[torch.Tensor], "str | None"], Callable]


class _Fingerprint:
    """The model identity of a call: a hash of the model's parameters, by name and by storage (two
    models with one architecture share the names, not the weights). Not the graph's code: the
    graphs one model compiles to at its several context capacities (the controller's buckets) are
    one model, and a revisit served across them is right; resolution, dtype and device are in the
    cache stamp."""

    def __init__(self, gm: fx.GraphModule) -> None:
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.params = [i for i, n in enumerate(inputs) if is_parameter(n)]
        names = [inputs[i].target for i in self.params]
        held = [f"{name}:{id(t)}" for name, t in gm.named_parameters()]  # not buffers: plan slots live there
        self.code = hashlib.sha1("".join(names + held).encode()).hexdigest()[:16]

    def of(self, args: Sequence) -> str:
        ptrs = ",".join(str(args[i].data_ptr()) for i in self.params if isinstance(args[i], torch.Tensor))
        return f"{self.code}:{hashlib.sha1(ptrs.encode()).hexdigest()[:16]}"


class ModelCallRunner:
    """A compiled denoiser call behind the denoising cache (one call = one step)."""

    def __init__(self, compiled: Callable, gm: fx.GraphModule, site: TransformerSite, options: CacheOptions) -> None:
        self.compiled, self.site, self.options = compiled, site, options
        self.fingerprint = _Fingerprint(gm)

    def __call__(self, *args):
        def compute() -> torch.Tensor:
            (out,) = self.compiled(*args)
            return out

        latents = args[self.site.latent_index]
        return (DENOISE.step(self, self.fingerprint.of(args), latents, compute, self.options),)


class _LazyCompiled(torch.nn.Module):
    """A piece of a split graph, compiled by the inner compiler on its first call (real inputs)."""

    def __init__(self, piece: fx.GraphModule, inner: InnerCompiler, mode: str | None) -> None:
        super().__init__()
        self.piece, self.inner, self.mode = piece, inner, mode
        self.compiled: Callable | None = None

    def forward(self, *args):
        if self.compiled is None:
            try:
                self.compiled = self.inner(self.piece, list(args), self.mode)
            except Exception as exc:  # noqa: BLE001 - an uncompilable piece still runs, as written
                log.warning("light_interaction: inner compiler failed on a chunk piece (%s: %s); running it as "
                            "written", type(exc).__name__, exc)
                self.compiled = self.piece.forward
        return self.compiled(*args)


class _CachedStep(torch.nn.Module):
    """The model piece of step ``index``: served from the cache on a hit, else run (and stored)."""

    def __init__(self, runner: "ChunkRunner", index: int, piece: _LazyCompiled, latent_position: int) -> None:
        super().__init__()
        self.index, self.piece, self.latent_position = index, piece, latent_position
        self._runner = [runner]  # a list: not a submodule

    def forward(self, *args):
        runner = self._runner[0]
        out = DENOISE.step(
            runner, runner.current_fingerprint, args[self.latent_position], lambda: self.piece(*args),
            runner.options, steps=runner.steps, step=self.index,
        )
        return out


class ChunkRunner:
    """A compiled chunk generation (unrolled denoising loop) whose model pieces go through the cache."""

    def __init__(
        self, gm: fx.GraphModule, steps: list[Step], inner: InnerCompiler, mode: str | None, options: CacheOptions
    ) -> None:
        self.options, self.steps = options, len(steps)
        self.fingerprint = _Fingerprint(gm)
        self.current_fingerprint = ""
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
        self.current_fingerprint = self.fingerprint.of(args)
        return self.split(*args)


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
