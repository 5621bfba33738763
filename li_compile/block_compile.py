"""Compile each repeated transformer block by itself: ``li_compile.compile_repeated_blocks(model)``.

``torch.compile(model)`` has Dynamo trace the model's Python once per graph, every block of a
54-block DiT included: at real depth that trace is most of a warm-up, and light_interaction has a
graph per context capacity (``benchmarks/warmup_cost.py``). PyTorch's regional compilation compiles
the repeated block instead (``module.compile()`` on each block): Dynamo traces one block per
distinct input shape and reuses that code for every block (weights are inputs, not constants), and
the top level runs as the user wrote it.

``compile_repeated_blocks`` does that with the light_interaction backend. Each block's graph has its
attention rewritten as in a whole-model graph, and every block's calls run with the model's one
accelerator (its plan slots, its controller, its cache and report: the blocks share the model's
accelerator table). The denoising cache decides per model call, and no compiled graph holds the
model's call here: put the model behind ``li_compile.cached(model, latent=..., timestep=...)`` and
call that in the chunk loop. Blocks are compiled in place, as ``module.compile()`` does. With
``context.row_blocks`` each block's compiled call goes through its model's ``RowBlocks``
(``li_compile.row_blocks``), which runs it on the chunk's rows alone where the context rows are reused.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from li_compile.accelerator import (
    ATTRIBUTE, BACKEND, BLOCKS_ATTRIBUTE, BlocksCompiled, accelerator_of, share_accelerators,
)
from li_compile.options import Options
from li_compile.regions import MIN_BLOCKS
from li_compile.repeated_blocks import repeated_block_lists


def compile_repeated_blocks(model: nn.Module, options: Options | Mapping[str, Any] | None = None, *,
                            dynamic: bool | None = False,
                            min_blocks: int = MIN_BLOCKS, **compile_kwargs: Any) -> nn.Module:
    """Compile every block of ``model``'s repeated-block lists (``nn.ModuleList`` of ``min_blocks`` or
    more modules of one class) in place with ``backend="light_interaction"`` and ``options`` (as
    ``torch.compile``'s), all routed to ``model``'s accelerator; returns ``model``, whose top level
    stays eager. ``dynamic`` and ``compile_kwargs`` go to ``module.compile``. ``li_compile.accelerator
    (model)``, ``li_compile.report(model)`` and ``li_compile.cached(model, ...)`` then work on it.
    Raises ``ValueError`` when ``model`` has no such list, or was compiled with other options or
    other ``dynamic``, ``min_blocks`` or compile arguments."""
    settings = Options.from_user(options)
    how = {"dynamic": dynamic, "min_blocks": min_blocks, **compile_kwargs}
    before = model.__dict__.get(BLOCKS_ATTRIBUTE)
    if before is not None:
        if (before.options, before.how) != (settings, how):
            raise ValueError(f"{type(model).__name__}'s blocks are already compiled with other options or settings "
                             f"({before.options}, {before.how}; now {how}): compile a copy of the model for others")
        return model
    blocks = compile_blocks_in_place(model, min_blocks, backend=BACKEND, options=options, dynamic=dynamic,
                                     **compile_kwargs)
    for block in blocks:  # compiled lazily: each block finds the model's accelerator when it first runs
        share_accelerators(model, block)
        if settings.context.row_blocks:
            compiled_call = getattr(block, "_compiled_call_impl", None)  # (what nn.Module.compile sets)
            if compiled_call is None:
                raise RuntimeError(f"context.row_blocks wraps the call that nn.Module.compile keeps in "
                                   f"_compiled_call_impl, which {type(block).__name__} lacks under torch "
                                   f"{torch.__version__}; turn context.row_blocks off")
            block._compiled_call_impl = RowBlockCall(block, settings, compiled_call)
    for key in [k for k, hook in model._forward_pre_hooks.items() if isinstance(hook, ModelCallStart)]:
        del model._forward_pre_hooks[key]  # a copy compiled again: its original's hook goes
    if settings.context.row_blocks:
        model.register_forward_pre_hook(ModelCallStart(settings))
    accelerator_of(model, settings)
    model.__dict__[BLOCKS_ATTRIBUTE] = BlocksCompiled(settings, how)
    return model


def compile_blocks_in_place(model: nn.Module, min_blocks: int = MIN_BLOCKS, **compile_kwargs: Any) -> list[nn.Module]:
    """``block.compile(**compile_kwargs)`` for every block of ``model``'s repeated-block lists
    (``repeated_block_lists``), the top level left as it is; returns the blocks. Raises
    ``ValueError`` when there is no such list (nothing is compiled then)."""
    lists = repeated_block_lists(model, min_blocks)
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of {min_blocks} or more blocks of one class "
                         "to compile; compile the whole model instead")
    blocks = [block for _, block_list in lists for block in block_list]
    for block in blocks:
        block.compile(**compile_kwargs)
    return blocks


def _row_blocks(module: nn.Module, options: Options) -> tuple[Any, Any]:
    """(the accelerator ``module`` shares for ``options``, its ``RowBlocks``), or (None, None)."""
    accelerator = module.__dict__.get(ATTRIBUTE, {}).get(options)
    if accelerator is None or accelerator.context_rows is None or accelerator.context_rows.blocks is None:
        return None, None
    return accelerator, accelerator.context_rows.blocks


class ModelCallStart:
    """A forward pre-hook of the model: each call starts a new chain of blocks (``RowBlocks.model_call``)."""

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, model: nn.Module, args: tuple) -> None:
        _, rows = _row_blocks(model, self.options)
        if rows is not None:
            rows.model_call()


class RowBlockCall:
    """A block's compiled call run through its model's ``RowBlocks`` (``context.row_blocks``): whole,
    or on the chunk's rows alone where the open chunk's step reuses the context rows. ``options``:
    the model's, which find its accelerator in the table the block shares."""

    def __init__(self, block: nn.Module, options: Options, call: Callable[..., Any]) -> None:
        self.block, self.options, self.call = block, options, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        accelerator, rows = _row_blocks(self.block, self.options)
        if rows is None:
            return self.call(*args, **kwargs)
        return rows.run(self.call, accelerator.plan.warming, args, kwargs)
