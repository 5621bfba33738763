"""Matrix-Game-3.0-style world model: dense (Inductor) vs light_interaction along a camera path with revisits.

Use the backend on your own world model: compile the denoiser (and, for a KV-cache model, the
pass that fills the cache) as usual, with one backend name::

    import torch, li_compile

    dit = MyCausalDiT(...).cuda().eval()                  # any nn.Module with SDPA / softmax attention
    dit = torch.compile(dit, backend="light_interaction", options={"cache": {"reuse_steps": 1}})
    for chunk in range(chunks):                           # your loop, unchanged: same calls, same shapes
        velocity = dit(x, sigma, kv_cache, actions, ...)
    print(li_compile.report(dit))                         # which attention sites were rewritten, and why

This script does that for the reference Matrix-Game-3.0-style world (``li_compile.worlds.matrix_game3``)
and compares it with the dense run:

    python examples/matrix_game3.py --preset tiny --chunks 16 --out out/mg3 --json out/mg3.json
"""

from li_compile.worlds import matrix_game3
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    run_example(matrix_game3, default_trajectory="loop")
