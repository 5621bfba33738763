"""Which accelerated model a compiled graph is running for, right now.

Dynamo shares one compiled graph between instances of a module class (their weights are graph
inputs), so a graph cannot be bound to the model that first compiled it: its plan slots and its
denoising cache must be those of the model that calls it. The backend wraps every graph it
returns (``accelerator.RoutedGraph``): a call finds its caller's ``Accelerator`` and makes it the
running one for the call's duration; ``li::planned_attention`` and the cache runners read it here.
A context variable, set and reset around each call: it holds nothing between calls.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator

_RUNNING: ContextVar[Any] = ContextVar("li_compile_running_accelerator", default=None)


def running() -> Any:
    """The ``Accelerator`` whose model's graph is running, or None outside any compiled graph."""
    return _RUNNING.get()


@contextlib.contextmanager
def running_for(accelerator: Any) -> Iterator[None]:
    """Make ``accelerator`` the running one for the block."""
    token = _RUNNING.set(accelerator)
    try:
        yield
    finally:
        _RUNNING.reset(token)
