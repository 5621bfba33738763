"""Which attention calls ran outside the backend's graphs: an eager audit of a compiled model.

The backend only sees the graphs Dynamo hands it. Attention in code Dynamo runs eagerly (a frame it
skipped, the Python between two graphs after a graph break) never reaches it, and a graph whose
passes failed compiles as written: neither appears among the report's sites. ``audit(compiled,
*args)`` runs the model once, eagerly (``torch.compiler.set_stance("force_eager")``), under a torch
function mode that records every ``F.scaled_dot_product_attention``, ``flex_attention`` and
``nn.MultiheadAttention`` call with its source line (``li_compile.reporting.user_location``, the rule
the report's site locations follow), and matches those lines against the attention sites the backend
saw. A site the passes cannot see into (``nn.MultiheadAttention``'s one opaque node) is not seen. The result is
kept on the model's accelerator, and ``li_compile.report`` prints it: "N attention calls ran
unaccelerated, here is where".

Why eagerly, once: a function mode active around the compiled model itself makes Dynamo trace the
mode and recompile on every call; an eager pass changes nothing compiled.
"""

from __future__ import annotations

import collections
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from li_compile.reporting import user_location

# function names the audit counts (nn.MultiheadAttention calls the last)
ATTENTION_CALLS = ("scaled_dot_product_attention", "flex_attention", "multi_head_attention_forward")


@dataclass
class Audit:
    """One eager forward's attention calls by source line (``calls``: "file.py:12 in forward" ->
    count), and the lines the backend saw in its graphs (``seen``: line -> site status)."""

    calls: dict[str, int] = field(default_factory=dict)
    seen: dict[str, str] = field(default_factory=dict)

    @property
    def unaccelerated(self) -> dict[str, int]:
        """The calls at lines no compiled graph of the backend holds."""
        return {line: n for line, n in self.calls.items() if line not in self.seen}

    @property
    def as_written(self) -> dict[str, int]:
        """The calls at lines the backend's graphs hold only as skipped sites (cross-attention, a
        ``score_mod``, sparsity off: left as written, dense; the report says why)."""
        return {line: n for line, n in self.calls.items() if self.seen.get(line) == "skipped"}

    def __str__(self) -> str:
        total, missed, written = sum(self.calls.values()), self.unaccelerated, self.as_written
        kept = (f"; {sum(written.values())} of them at skipped sites, left as written (the report's sites say why)"
                if written else "")
        if not missed:
            return f"audit: all {total} attention call(s) of one forward ran in the backend's graphs{kept}"
        lines = [f"audit: {sum(missed.values())} of {total} attention call(s) of one forward ran unaccelerated "
                 f"(eager code, a graph break, a graph compiled as written, or a call opaque to the passes){kept}:"]
        lines += [f"  {line}: {n} call(s)" for line, n in sorted(missed.items())]
        return "\n".join(lines)


class _AttentionCalls(TorchFunctionMode):
    """Counts attention calls by the user's source line (``user_location``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ATTENTION_CALLS:
            self.calls[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The user's line of the call ("file.py:12 in forward"), by the rule the report's sites use."""
    frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_stack()]
    return user_location(frames) or "unknown"


def audit(compiled: Any, *args: Any, **kwargs: Any) -> Audit:
    """Run ``compiled`` (what ``torch.compile(..., backend="light_interaction")`` returned, already
    called once so its graphs exist) eagerly on ``args``/``kwargs``, without gradients, and return
    which of its attention calls the backend's graphs hold (``Audit``); the model's report shows it."""
    from li_compile.accelerator import accelerator  # the accelerator keeps the audit: it imports this module

    acc = accelerator(compiled)
    sites = acc.report().sites
    mode = _AttentionCalls()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), mode:
        compiled(*args, **kwargs)
    seen: dict[str, str] = {}  # line -> "rewritten" where any site there was, else its sites' status
    for site in sites:
        if site.kind == "attention" and not site.detail.get("opaque") and seen.get(site.location) != "rewritten":
            seen[site.location] = site.status
    acc.audit = Audit(dict(mode.calls), seen)
    return acc.audit

