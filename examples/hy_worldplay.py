"""HY-WorldPlay-style world model: dense (Inductor) vs light_interaction along a camera path with revisits.

Use the backend on your own world model: compile the denoiser with the backend name, and let a
context controller pick each chunk's context (the README's "Using the backend on your own world
model" has the whole loop)::

    import torch, li_compile
    from li_compile.denoise_runtime import DENOISE

    model = torch.compile(MyWorldDiT(...).cuda().eval(), backend="light_interaction", dynamic=False,
                          options={"context": {"keep_threshold": 0.1}, "cache": {"reuse_steps": 2}})
    controller = li_compile.ContextController({"window_max": 12}, memory_k=8, fov_y_deg=60.0, layout=my_layout)
    with li_compile.session(controller), torch.no_grad():
        controller.warm_up(lambda capacity: model(x, sigmas[0], padded_context(capacity), ...))
        for chunk in range(chunks):
            sel = controller.select(chunk, past_poses, chunk_poses, past_latents)  # memory + recent frames
            DENOISE.begin_chunk(chunk, chunk_poses, sigmas)                          # revisit? early steps cached
            ...  # your sampler loop: model(x, sigma, gather(sel), ...) per step
            DENOISE.end_chunk()
    print(li_compile.report(model))           # which attention sites were rewritten, and why; per-chunk decisions

This script does that for the reference HY-WorldPlay-style world (``li_compile.worlds.hy_worldplay``)
and compares it with the dense run:

    python examples/hy_worldplay.py --preset tiny --chunks 16 --out out/hy --json out/hy.json
"""

from li_compile.worlds import hy_worldplay
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    run_example(hy_worldplay, default_trajectory="loop")
