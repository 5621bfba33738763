"""HY-WorldPlay-style world model: dense (Inductor) vs light_interaction along a camera path with revisits.

Use the backend on your own world model: compile the denoiser as usual, with one backend name::

    import torch, li_compile

    model = MyWorldDiT(...).cuda().eval()                 # any nn.Module with SDPA / softmax attention
    model = torch.compile(model, backend="light_interaction",
                          options={"context": {"keep_threshold": 0.1}, "cache": {"reuse_steps": 2}})
    for chunk in range(chunks):                           # your loop, unchanged: same calls, same shapes
        velocity = model(x, sigma, context_latents, ...)
    print(li_compile.report(model))                       # which attention sites were rewritten, and why

This script does that for the reference HY-WorldPlay-style world (``li_compile.worlds.hy_worldplay``)
and compares it with the dense run:

    python examples/hy_worldplay.py --preset tiny --chunks 16 --out out/hy --json out/hy.json
"""

from li_compile.worlds import hy_worldplay
from li_compile.worlds.report_tools import run_example

if __name__ == "__main__":
    run_example(hy_worldplay, default_trajectory="loop")
