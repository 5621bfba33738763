"""What the backend did: the sites each compilation found (rewritten or skipped, and why) and
per-chunk runtime statistics.

``li_compile.report(compiled)`` answers "did my attention get rewritten?" for a model compiled with
``backend="light_interaction"``. Each call of the backend (one per Dynamo graph: a graph break makes
two) adds a ``Compilation`` to the model's ``Accelerator``; the report lists them with the chunk
statistics of that model only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

MACHINERY = ("li_compile", "li_compile.passes", "li_compile.kernels")  # packages whose frames are not the user's
USER_SUBPACKAGES = ("worlds",)  # li_compile's reference world models: model code a user reads and copies


def user_location(frames: Iterable[tuple[str, int, str]]) -> str | None:
    """The user's source line of a call, "file.py:12 in forward": the innermost of ``frames``
    ((path, line, function), outermost first) outside torch and outside li_compile's own machinery
    (li_compile/worlds/ is user code), or None if every frame is inside them. The report's site
    locations and the audit's call lines both come from here, so the two match."""
    for path, line, function in reversed(list(frames)):
        if _is_user_code(path):
            return f"{os.path.basename(path)}:{line} in {function}"
    return None


@functools.cache
def _is_user_code(path: str) -> bool:
    real = os.path.realpath(path)
    user, machinery = _code_dirs()
    return any(real.startswith(d) for d in user) or not any(real.startswith(d) for d in machinery)


@functools.cache
def _code_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(user code folders inside li_compile, machinery folders: li_compile's packages and torch)."""
    user = [os.path.join(d, sub) for d in _package_dirs("li_compile") for sub in USER_SUBPACKAGES]
    machinery = [d for name in MACHINERY for d in _package_dirs(name)] + [os.path.dirname(torch.__file__)]
    return _resolved(user), _resolved(machinery)


def _package_dirs(name: str) -> list[str]:
    return list(importlib.util.find_spec(name).submodule_search_locations)


def _resolved(dirs: list[str]) -> tuple[str, ...]:
    """Folders with symlinks resolved (passes/ and kernels/ may be linked into li_compile/) and a
    trailing separator, so a path is under one exactly when it starts with it."""
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


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

    def note(self, site: Site) -> None:
        """Add ``site`` to the report unless an equal one is there (a piece compiled per shape says it once)."""
        if site not in self.sites:
            self.sites.append(site)


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
    calibration: str | None = None  # the calibrated plans' recall per layer (``Calibration.table``)
    audit: str | None = None  # which attention calls ran outside the backend's graphs (``li_compile.audit``)
    boundary_cache: str | None = None  # the denoising cache around the whole call (``li_compile.cached``)
    cache_idle: str | None = None  # why the enabled denoising cache never acted, where no site says so

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
        if self.calibration is not None:
            lines += ["  calibrated tile plans:", *("    " + line for line in self.calibration.splitlines())]
        if self.audit is not None:
            lines += ["  " + line for line in self.audit.splitlines()]
        if self.boundary_cache is not None:
            lines.append(f"  denoising cache at the call boundary: {self.boundary_cache}")
        if self.cache_idle is not None:
            lines.append(f"  denoising cache: {self.cache_idle}")
        for stats in self.chunks:
            values = ", ".join(f"{k}={v}" for k, v in stats.values.items())
            lines.append(f"  chunk {stats.chunk}: {values}")
        return "\n".join(lines)


def report(compiled: Any) -> Report:
    """The report of ``compiled``, a model or function returned by ``torch.compile(...,
    backend="light_interaction")`` (or a module compiled in place with ``module.compile(...)``):
    every graph its accelerator compiled, the latest per graph, and its per-chunk statistics.
    Raises ``ValueError`` if it has not been compiled yet: compilation is lazy, call it once first."""
    from li_compile.accelerator import accelerator  # the accelerator builds on this module

    return accelerator(compiled).report()
