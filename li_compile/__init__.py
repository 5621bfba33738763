"""li-compile: a torch.compile backend for interactive video world models.

    compiled = torch.compile(model, backend="light_interaction", options={...})
    with li_compile.session(li_compile.ContextController(...)):   # per-chunk context decisions
        ...                                                         # your chunk loop
    print(li_compile.report(compiled))
"""

from li_compile.controller.context import ContextController
from li_compile.controller.session import session
from li_compile.options import CacheOptions, ContextOptions, Options, SparsityOptions
from li_compile.reporting import Report, Site, report

__all__ = [
    "CacheOptions", "ContextController", "ContextOptions", "Options", "Report", "Site", "SparsityOptions", "report",
    "session",
]
__version__ = "0.1.0"
