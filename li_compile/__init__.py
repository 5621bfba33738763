"""li-compile: a torch.compile backend for interactive video world models.

    compiled = torch.compile(model, backend="light_interaction", options={...})
    print(li_compile.report(compiled))
"""

from li_compile.options import CacheOptions, ContextOptions, Options, SparsityOptions
from li_compile.reporting import Report, Site, report

__all__ = ["CacheOptions", "ContextOptions", "Options", "Report", "Site", "SparsityOptions", "report"]
__version__ = "0.1.0"
