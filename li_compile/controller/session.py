"""``li_compile.session(controller)``: attach a context controller to the models compiled in a block.

A compiled model reads its attention plan from the plan slots (``li_compile.plan.PLAN``); the
controller attached here is the one that writes them, chunk by chunk. Inside the block,
``active_controller()`` returns it (a generation loop uses it as its context policy); when the
outermost session ends every plan slot is cleared, so outside a session compiled models compute
exactly what they would dense::

    controller = ContextController(options, memory_k=spec.memory, layout=world.layout)
    with li_compile.session(controller):
        generate(world, trajectory, policy=controller)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from li_compile.controller.context import ContextController
from li_compile.plan import PLAN

_ACTIVE: list[ContextController] = []  # innermost last
_LAST: list[ContextController] = []  # the controller of the latest session (for li_compile.report)


@contextlib.contextmanager
def session(controller: ContextController) -> Iterator[ContextController]:
    """Make ``controller`` the active one for the block; clear every plan when the last session ends."""
    if not isinstance(controller, ContextController):
        raise ValueError(f"session() needs a ContextController, got {type(controller).__name__}")
    _ACTIVE.append(controller)
    _LAST[:] = [controller]
    try:
        yield controller
    finally:
        _ACTIVE.pop()
        if not _ACTIVE:
            PLAN.clear()


def active_controller() -> ContextController | None:
    """The controller of the innermost open session, or None outside any session."""
    return _ACTIVE[-1] if _ACTIVE else None


def last_controller() -> ContextController | None:
    """The controller of the latest session, open or ended (its stats fill ``li_compile.report``)."""
    return _LAST[0] if _LAST else None
