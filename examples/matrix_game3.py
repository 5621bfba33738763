"""Matrix-Game-3.0-style world model: dense (Inductor) vs light_interaction along a camera path with revisits.

Use the backend on your own world model: compile the denoiser (and, for a KV-cache model, the
pass that fills the cache) with the backend name, and let a context controller pick which past
frames enter the cache each chunk (the README's "Using the backend on your own world model" has
the whole loop)::

    import torch, li_compile
    from li_compile.denoise_runtime import DENOISE

    dit = torch.compile(MyCausalDiT(...).cuda().eval(), backend="light_interaction", dynamic=False,
                        options={"cache": {"reuse_steps": 1}})
    controller = li_compile.ContextController({"window_max": 8}, memory_k=4, fov_y_deg=60.0, layout=my_layout)
    with li_compile.session(controller), torch.no_grad():
        controller.warm_up(lambda capacity: dit(x, sigmas[0], empty_kv_cache(capacity), actions, ...))
        for chunk in range(chunks):
            sel = controller.select(chunk, past_poses, chunk_poses, past_latents)  # frames for the KV cache
            DENOISE.begin_chunk(chunk, chunk_poses, sigmas)
            ...  # fill the cache from sel, then your sampler loop: dit(x, sigma, kv_cache, actions, ...)
            DENOISE.end_chunk()
    print(li_compile.report(dit))             # which attention sites were rewritten, and why; per-chunk decisions

This script does that for the reference Matrix-Game-3.0-style world (``li_compile.worlds.matrix_game3``)
and compares it with the dense run:

    python examples/matrix_game3.py --preset tiny --chunks 16 --out out/mg3 --json out/mg3.json
"""

from li_compile.worlds import matrix_game3
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    run_example(matrix_game3, default_trajectory="loop")
