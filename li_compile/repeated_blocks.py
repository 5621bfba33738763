"""Trace each repeated transformer block once: ``li_compile.nest_repeated_blocks(model)``.

Dynamo traces a model's Python once per graph, every block of a 54-block DiT included, and that
trace is most of a warm-up at real depth (``benchmarks/warmup_cost.py``). Marking the block's
forward as a ``torch.compiler.nested_compile_region`` makes Dynamo trace one block and call that
body once per block (``invoke_subgraph``); the backend rewrites the body's attention once for all
of them (``passes.nested_regions``) and Inductor compiles it once.

``nest_repeated_blocks`` does that marking for a model the user cannot edit: each block of a
``nn.ModuleList`` of ``MIN_BLOCKS`` or more modules of one class gets a subclass of its class whose
``forward`` is the nested region (the instance's class is swapped; the original class and other
models are untouched). In code you own, decorating the block's ``forward`` with
``@torch.compiler.nested_compile_region`` does the same. It pays only where Dynamo reuses one trace
of the region for every call (torch 2.13; ``dynamo_reuses_regions``): torch 2.11 traces each call
again, and marking warns there. Dynamo refuses a body with side effects
(in-place writes to a cache, Python state changed per call) or with aliasing inputs or outputs
(HY's cached form passes one camera tensor as two arguments): the first call raises
``UncapturedHigherOrderOpError``, naming the nodes. Such a model is compiled without this marking.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from li_compile.regions import MIN_BLOCKS


def nest_repeated_blocks(model: nn.Module, min_blocks: int = MIN_BLOCKS) -> list[str]:
    """Mark the blocks of every ``ModuleList`` of ``model`` holding at least ``min_blocks`` modules of
    one class as nested compile regions (in place); returns the lists' names (empty: none found).
    Call it before ``torch.compile``."""
    if getattr(torch.compiler, "nested_compile_region", None) is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.compiler.nested_compile_region (torch 2.8 or later)")
    if not dynamo_reuses_regions():
        warnings.warn(f"torch {torch.__version__}: Dynamo traces every call of a nested compile region again "
                      "(torch 2.13 reuses one trace), so marking the blocks makes warm-up longer, not shorter "
                      "(HY full, 54 blocks, torch 2.11: 91 s -> 134 s); the attention is rewritten either way",
                      stacklevel=2)
    marked = []
    for name, blocks in repeated_block_lists(model, min_blocks):
        nested = _nested_class(type(blocks[0]))
        for block in blocks:
            block.__class__ = nested
        marked.append(name)
    return marked


def repeated_block_lists(model: nn.Module, min_blocks: int = MIN_BLOCKS) -> list[tuple[str, nn.ModuleList]]:
    """``(name, list)`` of every ``nn.ModuleList`` in ``model`` holding at least ``min_blocks``
    modules, all of one class: the model's repeated transformer blocks."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) >= min_blocks
            and len({type(block) for block in module}) == 1]


def dynamo_reuses_regions() -> bool:
    """Whether this torch's Dynamo traces a nested compile region once and reuses that trace for
    later calls with matching inputs (``torch._dynamo.variables.invoke_subgraph``, torch 2.13; not in
    torch 2.11)."""
    try:
        from torch._dynamo.variables import invoke_subgraph
    except ImportError:
        return False
    return hasattr(invoke_subgraph, "stamp_out_subgraph")


@functools.cache
def _nested_class(cls: type) -> type:
    """``cls`` with its forward as a nested compile region (one subclass per class; ``cls`` itself
    when it already is one)."""
    if getattr(cls, "_li_nested_region", False):
        return cls
    forward = torch.compiler.nested_compile_region(cls.forward)
    return type(cls.__name__, (cls,), {"forward": forward, "_li_nested_region": True,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})
