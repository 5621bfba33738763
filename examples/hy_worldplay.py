"""HY-WorldPlay-style world model: dense (Inductor) vs light_interaction along a camera path with revisits.

Use the backend on your own world model: compile the denoiser with the backend name, configure its
accelerator once, and run each chunk inside ``li.chunk(...)`` (the README's "Using the backend on
your own world model" has the whole loop)::

    import torch, li_compile

    model = torch.compile(MyWorldDiT(...).cuda().eval(), backend="light_interaction", dynamic=False,
                          options={"context": {"keep_threshold": 0.1, "window_max": 12}})
    li = li_compile.accelerator(model)
    li.configure(memory_k=8, fov_y_deg=60.0, layout=my_layout, revisit_inputs=("context", "camera"))
    with torch.no_grad():
        li.warm_up(lambda capacity: model(x, sigmas[0], torch.zeros(1, capacity, *frame), ...))
        for c in range(chunks):
            with li.chunk(c, past_poses, chunk_poses, past_latents, sigmas) as chunk:
                context, valid = chunk.context(past_latents)[None], chunk.valid[None]
                for i in range(steps):
                    chunk.step(i)
                    v = model(x, sigmas[i], context, valid, ...)
    print(li_compile.report(model))   # which attention sites were rewritten, and why; per-chunk decisions

This script does that for the reference HY-WorldPlay-style world (``li_compile.worlds.hy_worldplay``)
and compares it with the dense run:

    python examples/hy_worldplay.py --preset tiny --chunks 16 --out out/hy --json out/hy.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/: the renderer of the trained rooms

from li_compile.worlds import hy_worldplay
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    run_example(hy_worldplay, default_trajectory="loop")
