"""The inner compilers the backend hands the rewritten graph to: Inductor, eager, or TensorRT."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch import fx

log = logging.getLogger(__name__)

# ``inner(gm, example_inputs, mode) -> compiled callable``: every entry of ``INNER``
InnerCompiler = Callable[[fx.GraphModule, Sequence[Any], "str | None"], Callable]


def compile_inductor(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str | None) -> Callable:
    """Inductor, with ``torch.compile``'s ``mode`` translated to its config patches."""
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode and mode != "default" else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def compile_eager(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str | None) -> Callable:
    """Run the (rewritten) graph as Python: useful for debugging passes."""
    return gm.forward


def compile_tensorrt(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str | None) -> Callable:
    """torch-tensorrt's Dynamo backend (``Options`` checked that it imports)."""
    import torch_tensorrt  # noqa: F401  (registers the "tensorrt" Dynamo backend)
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("tensorrt")(gm, example_inputs)


INNER: dict[str, Callable] = {"inductor": compile_inductor, "eager": compile_eager, "tensorrt": compile_tensorrt}


def compile_or_as_written(inner: InnerCompiler, piece: fx.GraphModule, args: Sequence[Any], mode: str | None,
                          what: str, failed: Callable[[str], None]) -> Callable:
    """``inner`` applied to ``piece`` (a piece of a split graph, compiled on its first call, with its
    real ``args``); if the inner compiler fails, ``piece`` as written, with a warning naming ``what``
    it is and ``failed(reason)`` (for the report): an uncompilable piece costs speed, never the run."""
    try:
        return inner(piece, list(args), mode)
    except Exception as exc:  # noqa: BLE001 - an uncompilable piece still runs, as written
        reason = f"inner compiler failed on {what} ({type(exc).__name__}: {str(exc)[:200]}); it runs as written"
        log.warning("light_interaction: %s", reason)
        failed(reason)
        return piece.forward

