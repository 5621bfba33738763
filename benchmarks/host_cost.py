"""The backend's host work per chunk at the full presets' shapes, without running the model.

For each world's ``full`` preset it configures an accelerator with the world's token layout and
plan slots at every capacity bucket, then times ``with accelerator.chunk(...)`` (context selection,
tile plan, cache bookkeeping) plus the context gather, along a trajectory, on the CPU. A miss chunk
of light_interaction costs this much more host time than a dense chunk, whose loop only gathers.

    python benchmarks/host_cost.py [--trajectory out_and_back] [--chunks 12] [--threads 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import li_compile
from li_compile.options import Options
from li_compile.plan import SlotSignature
from li_compile.sequence import SequenceLayout
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories

FORMS = {"hy_worldplay": (hy_worldplay, "all"), "matrix_game3_cached": (matrix_game3, "chunk")}  # Matrix-Game: its KV-cache form


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectory", default="out_and_back", choices=sorted(trajectories.TRAJECTORIES))
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, (module, queries) in FORMS.items():
        spec = module.PRESETS["full"]
        grid_h, grid_w = spec.grid

        def layout(capacity: int) -> SequenceLayout:
            return SequenceLayout(capacity, spec.chunk_frames, grid_h, grid_w, queries=queries)

        frames = args.chunks * spec.chunk_frames
        trajectory = trajectories.make(args.trajectory, frames, chunk_frames=spec.chunk_frames)
        accelerator = li_compile.Accelerator(Options(), spec.name)
        accelerator.configure(memory_k=spec.memory, fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect,
                              layout=layout)
        for capacity in accelerator.controller.warm_up_buckets():  # the slots a compiled model would make
            s = layout(capacity)
            accelerator.plan.slot_for(SlotSignature(1, spec.heads, s.q_len, s.kv_len, "cpu", 128, 128))
        poses = trajectory.poses.float()
        latents = torch.randn(frames, spec.latent_channels, spec.latent_h, spec.latent_w).to(spec.dtype)
        times = []
        for c in range(1, args.chunks):
            first = c * spec.chunk_frames
            start = time.perf_counter()
            with accelerator.chunk(c, poses[:first], poses[first:first + spec.chunk_frames], latents[:first],
                                   spec.sigmas()) as scope:
                scope.context(latents[:first])
            times.append(1000 * (time.perf_counter() - start))
        print(f"{name} ({spec.name}) {args.trajectory}: {statistics.median(times):.0f} ms per chunk (median of "
              f"{len(times)}, {min(times):.0f}-{max(times):.0f}) on {args.threads} CPU threads")


if __name__ == "__main__":
    main()
