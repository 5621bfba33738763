"""What ``cache.reuse_steps="auto"`` measures and chooses on the trained world (CPU is enough).

Generates ``--chunks`` chunks of the ``trained`` HY world along ``--trajectory`` with the backend
(eager inner compiler, defaults otherwise, ``reuse_steps="auto"``) and prints, for every chunk that
met a revisit, the cache decision, the steps served and the calibration: per early step, the lowest
PSNR of the prediction the cache would serve against the fresh one, and the number of steps chosen.

    python benchmarks/reuse_auto.py [--chunks 24] [--trajectory loop] [--target-db 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/: the trained world's renderer

import li_compile  # noqa: E402
from li_compile.worlds import hy_worldplay, trajectories  # noqa: E402
from li_compile.worlds.pipeline import generate  # noqa: E402
from li_compile.worlds.report_tools import configure_for, light_interaction_options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--trajectory", default="loop", choices=sorted(trajectories.TRAJECTORIES))
    parser.add_argument("--target-db", type=float, default=30.0)
    args = parser.parse_args()
    world = hy_worldplay.build("trained")
    trajectory = trajectories.make(args.trajectory, args.chunks * world.spec.chunk_frames,
                                   chunk_frames=world.spec.chunk_frames)
    options = light_interaction_options(world, {"inner": "eager", "cache": {"reuse_steps": "auto",
                                                                            "reuse_target_db": args.target_db}})
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    configure_for(accelerator, world, trajectory)
    generate(compiled, trajectory, accelerator=accelerator, decode=False)
    for stats in accelerator.denoise.history:
        v = stats.values
        if v["cache"] != "miss":
            print(f"chunk {stats.chunk}: {v['cache']}, steps served {v['steps_reused']}, auto {v['reuse_auto']}")


if __name__ == "__main__":
    main()
