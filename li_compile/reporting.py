"""What the backend did: the sites each compilation found (rewritten or skipped, and why) and
per-chunk runtime statistics.

``li_compile.report(compiled)`` answers "did my attention get rewritten?" for a model compiled with
``backend="light_interaction"``. Each call of the backend (one per Dynamo graph: a graph break makes
two) appends a ``Compilation`` to the log of the compiled object that triggered it; the report shows
the latest compilation of each graph.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Site:
    """One place in a graph that a pass looked at.

    ``kind``: "attention", "sampler", "graph", ...; ``status``: "rewritten" or "skipped";
    ``reason``: why (always set when skipped); ``location``: the user's source line, if known.
    """

    kind: str
    status: str
    reason: str = ""
    location: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("rewritten", "skipped"):
            raise ValueError(f"Site.status must be 'rewritten' or 'skipped', got {self.status!r}")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"a skipped {self.kind} site needs a reason")


@dataclass
class Compilation:
    """One call of the backend: the graph it was handed, the sites its passes found, the inner compiler."""

    graph_name: str
    code_name: str
    inner: str
    sites: list[Site] = field(default_factory=list)


@dataclass
class ChunkStats:
    """Runtime statistics of one generated chunk (filled by the controller)."""

    chunk: int
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """The compilations of one compiled model or function, and its per-chunk statistics."""

    target: str
    compilations: list[Compilation]
    chunks: list[ChunkStats] = field(default_factory=list)

    @property
    def sites(self) -> list[Site]:
        return [site for comp in self.compilations for site in comp.sites]

    def __str__(self) -> str:
        lines = [f"li_compile report for {self.target}: {len(self.compilations)} graph(s), {len(self.sites)} site(s)"]
        rows = [("graph", "kind", "status", "location", "reason")]
        for comp in self.compilations:
            for site in comp.sites:
                rows.append((comp.graph_name, site.kind, site.status, site.location, site.reason))
        if len(rows) == 1:
            lines.append("  no sites found: no pass matched anything in these graphs")
        else:
            widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
            for row in rows:
                lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        for stats in self.chunks:
            values = ", ".join(f"{k}={v}" for k, v in stats.values.items())
            lines.append(f"  chunk {stats.chunk}: {values}")
        return "\n".join(lines)


class _Log:
    """Compilations keyed by the user's original module or function (weakly)."""

    def __init__(self) -> None:
        self._by_target: "weakref.WeakKeyDictionary[Any, dict[str, Compilation]]" = weakref.WeakKeyDictionary()
        self._by_code: dict[Any, dict[str, Compilation]] = {}

    def add(self, target: Any, code: Any, comp: Compilation) -> None:
        if target is not None:
            self._by_target.setdefault(target, {})[comp.graph_name] = comp
        if code is not None:
            self._by_code.setdefault(code, {})[comp.graph_name] = comp

    def find(self, target: Any, code: Any) -> list[Compilation]:
        found = self._by_target.get(target) or self._by_code.get(code) or {}
        return list(found.values())


_LOG = _Log()


def _compiling_target() -> tuple[Any, Any]:
    """The user's module/function whose call triggered the current compilation, and the code object
    Dynamo is compiling. Found by walking the Python stack up to Dynamo's wrapper frames."""
    target = code = None
    frame = sys._getframe(1)
    while frame is not None:
        name, filename = frame.f_code.co_name, frame.f_code.co_filename
        if code is None and name == "_compile" and filename.endswith("convert_frame.py"):
            code = frame.f_locals.get("code")
        if name == "compile_wrapper" and filename.endswith("eval_frame.py"):
            fn = inspect.unwrap(frame.f_locals.get("fn"))
            owner = getattr(fn, "__self__", None)
            target = owner if isinstance(owner, torch.nn.Module) else fn
            break
        frame = frame.f_back
    return target, code


def record_compilation(comp: Compilation) -> None:
    """Attach ``comp`` to the compiled model/function being compiled right now."""
    target, code = _compiling_target()
    try:
        _LOG.add(target, code, comp)
    except TypeError:  # a target that cannot be weakly referenced: fall back to its code object
        _LOG.add(None, code, comp)


def _original(compiled: Any) -> tuple[Any, Any, str]:
    if isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule):
        orig = compiled._orig_mod
        return orig, type(orig).forward.__code__, type(orig).__name__
    if isinstance(compiled, torch.nn.Module):
        return compiled, type(compiled).forward.__code__, type(compiled).__name__
    orig = getattr(compiled, "_torchdynamo_orig_callable", None)
    if orig is None:
        raise ValueError(
            f"li_compile.report() needs what torch.compile(..., backend='light_interaction') returned, got "
            f"{type(compiled).__name__} {getattr(compiled, '__name__', '')!s}, which was not compiled by torch.compile"
        )
    code = getattr(orig, "__code__", None)
    return orig, code, getattr(orig, "__qualname__", repr(orig))


def report(compiled: Any) -> Report:
    """The report of the latest compilation(s) of ``compiled``, a model or function returned by
    ``torch.compile(..., backend="light_interaction")`` (or a module compiled in place with
    ``module.compile(...)``). Raises ``ValueError`` if it has not been compiled yet: compilation
    is lazy, so call it once first."""
    orig, code, name = _original(compiled)
    comps = _LOG.find(orig, code)
    if not comps:
        raise ValueError(
            f"{name} has not been compiled by the light_interaction backend yet: torch.compile is lazy, "
            "call the compiled model once, then ask for its report"
        )
    return Report(target=name, compilations=comps, chunks=_chunk_stats())


def _chunk_stats() -> list[ChunkStats]:
    """Per-chunk statistics of the latest run: the last attached context controller's decisions,
    merged by chunk with the denoising cache's (imported here: both modules import this one)."""
    from li_compile.controller.session import last_controller
    from li_compile.denoise_runtime import DENOISE

    merged: dict[int, ChunkStats] = {}
    controller = last_controller()
    for stats in [*(controller.stats if controller else []), *DENOISE.history]:
        merged.setdefault(stats.chunk, ChunkStats(stats.chunk)).values.update(stats.values)
    return [merged[c] for c in sorted(merged)]
