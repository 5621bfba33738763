"""li-compile: a torch.compile backend for interactive video world models.

    li_compile.nest_repeated_blocks(model)           # optional: Dynamo traces one block for all of them
    compiled = torch.compile(model, backend="light_interaction", options={...}, dynamic=False)
    # or only the repeated blocks, the top level eager (fastest warm-up; the cache at the call boundary):
    #   compiled = li_compile.cached(li_compile.compile_repeated_blocks(model, {...}), latent="x", timestep="t")
    li = li_compile.accelerator(compiled)            # this model's plans, cache and report
    li.configure(memory_k=4, fov_y_deg=60, layout=..., revisit_inputs=(...))
    with li.chunk(c, past_poses, chunk_poses, past_latents, sigmas) as chunk:
        ...                                           # chunk.context(...), chunk.valid, chunk.step(i)
    with li_compile.calibrate(compiled, target=0.99) as run:   # optional: a few chunks measured dense,
        ...                                           # then one tile plan per head (run.calibration)
    li_compile.audit(compiled, *example_inputs)       # optional: attention calls that ran outside its graphs
    dit = li_compile.cached(compiled, latent="x", timestep="t")  # optional: the cache around the whole call
    print(li_compile.report(compiled))
"""

from li_compile.audit import Audit, audit
from li_compile.block_compile import compile_repeated_blocks
from li_compile.accelerator import Accelerator, CalibrationScope, ChunkScope, accelerator, calibrate
from li_compile.controller.calibration import Calibration
from li_compile.controller.selection import ContextSelection
from li_compile.module_cache import CachedCalls, cached
from li_compile.options import CacheOptions, ContextOptions, Options, SparsityOptions
from li_compile.reporting import Report, Site, report
from li_compile.repeated_blocks import nest_repeated_blocks

__all__ = [
    "Accelerator", "Audit", "CacheOptions", "CachedCalls", "Calibration", "CalibrationScope", "ChunkScope", "ContextOptions", "ContextSelection",
    "Options", "Report", "Site", "SparsityOptions", "accelerator", "audit", "cached", "calibrate", "compile_repeated_blocks",
    "nest_repeated_blocks",
    "report",
]
__version__ = "0.1.0"
