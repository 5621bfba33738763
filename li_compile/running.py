"""Which accelerated model a compiled graph is running for, right now.

Dynamo shares one compiled graph between instances of a module class (their weights are graph
inputs), so a graph cannot be bound to the model that first compiled it: its plan slots and its
denoising cache must be those of the model that calls it. The backend wraps every graph it
returns (``accelerator.RoutedGraph``): a call finds its caller's ``Accelerator`` and makes it the
running one for the call's duration, with the Python arguments the user's call was made with;
``li::planned_attention`` and the cache runners read them here. Context variables, set and reset
around each call: they hold nothing between calls.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Mapping

_RUNNING: ContextVar[Any] = ContextVar("li_compile_running_accelerator", default=None)
_ARGUMENTS: ContextVar[Callable[[], Mapping[str, Any]]] = ContextVar("li_compile_running_arguments", default=dict)


def running() -> Any:
    """The ``Accelerator`` whose model's graph is running, or None outside any compiled graph."""
    return _RUNNING.get()


def running_arguments() -> Mapping[str, Any]:
    """The arguments of the user's compiled call that is running, by name (empty when unknown);
    bound now, on the cache's early steps that key a call, not on every call."""
    return _ARGUMENTS.get()()


@contextlib.contextmanager
def running_for(accelerator: Any, arguments: Callable[[], Mapping[str, Any]] = dict) -> Iterator[None]:
    """Make ``accelerator`` the running one for the block, and ``arguments()`` (the user's call's, by
    name) what ``running_arguments`` returns."""
    token, arguments_token = _RUNNING.set(accelerator), _ARGUMENTS.set(arguments)
    try:
        yield
    finally:
        _RUNNING.reset(token)
        _ARGUMENTS.reset(arguments_token)
