"""Matrix-Game-3.0-style world model: dense (Inductor) vs light_interaction along a camera path with revisits.

Use the backend on your own world model: compile the denoiser with the backend name, configure its
accelerator once, and run each chunk inside ``li.chunk(...)``; a KV-cache model fills its cache
from the chunk's context (the README's "Using the backend on your own world model" has the loop)::

    import torch, li_compile

    dit = torch.compile(MyCausalDiT(...).cuda().eval(), backend="light_interaction", dynamic=False)
    li = li_compile.accelerator(dit)
    li.configure(memory_k=4, fov_y_deg=60.0, layout=my_layout, revisit_inputs=("kv", "camera", "actions"))
    with torch.no_grad():
        li.warm_up(lambda capacity: dit(x, sigmas[0], empty_kv_cache(capacity), ...))
        for c in range(chunks):
            with li.chunk(c, past_poses, chunk_poses, past_latents, sigmas) as chunk:
                kv = encode(chunk.context(past_latents)[None], chunk.valid[None])   # the KV cache pass
                for i in range(steps):
                    chunk.step(i)
                    v = dit(x, sigmas[i], kv, chunk.valid[None], ...)
    print(li_compile.report(dit))

This script does that for the reference Matrix-Game-3.0-style world (``li_compile.worlds.matrix_game3``)
and compares it with the dense run:

    python examples/matrix_game3.py --preset tiny --chunks 16 --out out/mg3 --json out/mg3.json

By default the world runs as upstream does (memory and re-injected frames re-run with the chunk at
every step, no KV cache): ``model(x, sigma, context, context_valid, ...)`` is a plain full-sequence
model, and the chunk loop has no KV-cache pass. ``--form cached`` runs its KV-cache form, the loop
above.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/: the renderer of the trained rooms

from li_compile.worlds import matrix_game3
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    run_example(matrix_game3, default_trajectory="loop")
