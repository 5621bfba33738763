"""The inner compilers the backend hands the rewritten graph to: Inductor, eager, or TensorRT."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import fx


def compile_inductor(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str | None) -> Callable:
    """Inductor, with ``torch.compile``'s ``mode`` translated to its config patches."""
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode and mode != "default" else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def compile_eager(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str | None) -> Callable:
    """Run the (rewritten) graph as Python: useful for debugging passes."""
    return gm.forward


def compile_tensorrt(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], mode: str | None) -> Callable:
    """torch-tensorrt's Dynamo backend, if installed."""
    try:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" Dynamo backend)
    except ImportError as exc:
        raise ImportError(
            "light_interaction option inner='tensorrt' needs torch-tensorrt, which is not installed: "
            "pip install li-compile[tensorrt]"
        ) from exc
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend("tensorrt")(gm, example_inputs)


INNER: dict[str, Callable] = {"inductor": compile_inductor, "eager": compile_eager, "tensorrt": compile_tensorrt}
