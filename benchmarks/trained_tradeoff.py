"""Fidelity against speedup of light_interaction on the trained world, as its thresholds vary.

    python -m benchmarks.trained_tradeoff --out out/tradeoff          # CPU, shipped weights

On held-out rooms along the revisit trajectories (loop, orbit, out_and_back), every setting of
``SETTINGS`` runs the trained HY-WorldPlay-style world from the true first chunk, and is scored
against the dense run of the same world (PSNR/SSIM of the accelerated frames: what the
approximation costs) and against the renderer's ground truth (what the user sees), with its
time against dense. Both runs execute their graphs eagerly (``inner="eager"``, the dense world
uncompiled), so the speedup is what pruning and the cache save in model work, not what Inductor
or the GPU kernel add. Writes ``tradeoff.json`` and ``tradeoff.png`` (PSNR against speedup).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from training.fidelity import add_case_arguments, rollout, trained_world_and_cases
from li_compile.worlds.pipeline import DensePolicy
from li_compile.worlds.report_tools import frame_psnr, light_interaction_setup, psnr, ssim

REVISIT_TRAJECTORIES = ("loop", "orbit", "out_and_back")
SETTINGS: dict[str, dict[str, Any]] = {  # label -> backend options (on top of inner="eager")
    "defaults": {},
    "keep 0.3": {"context": {"keep_threshold": 0.3}},
    "keep 0.5": {"context": {"keep_threshold": 0.5}},
    "keep 0.7": {"context": {"keep_threshold": 0.7}},
    "revisit 0.8": {"cache": {"revisit_threshold": 0.8}},
    "revisit 0.95": {"cache": {"revisit_threshold": 0.95}},
    "reuse 1 step": {"cache": {"reuse_steps": 1}},
    "reuse 3 steps": {"cache": {"reuse_steps": 3}},
    "window grow": {"context": {"window_rule": "grow_on_motion"}},
    "window shrink": {"context": {"window_rule": "shrink_on_motion"}},
    "cache off": {"cache": {"enabled": False}},
    "context off": {"context": {"enabled": False}},
    "keep 0.7 no fill": {"context": {"keep_threshold": 0.7, "fill_density": 1.0}},
    "density 0.5": {"sparsity": {"density": 0.5}},
    "density 0.25": {"sparsity": {"density": 0.25}},
    "density 0.5 blocks 32": {"sparsity": {"density": 0.5, "block_q": 32, "block_k": 32}},
    "density 0.25 blocks 32": {"sparsity": {"density": 0.25, "block_q": 32, "block_k": 32}},
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(world, codec, cases, options: dict[str, Any], dense: list[torch.Tensor], dense_s: float) -> dict[str, float]:
    """One setting over all cases: speedup, PSNR/SSIM against dense and against ground truth."""
    torch._dynamo.reset()  # every setting compiles afresh (and stays under Dynamo's recompile limit)
    setup = light_interaction_setup(world, {"inner": "eager", **options})
    setup.warm_up()
    spec = world.spec
    frames, seconds, hits, pruned = [], 0.0, 0, 0
    for case in cases:
        driver = setup.driver(case.trajectory)
        with driver.scope():
            out, s = timed(lambda: rollout(setup.world, codec, case, driver.policy, then=driver.step_hook))
        stats = [driver.chunk_stats(c, None) for c in range(1, len(out) // spec.chunk_frames)]
        hits += sum(st["cache_hits"] for st in stats)
        pruned += sum(st["memory_pruned"] for st in stats)
        frames.append(out)
        seconds += s
    generated = slice(spec.chunk_frames, None)  # the true first chunk is given, not generated
    pairs = list(zip(frames, dense, cases))
    return {
        "speedup": dense_s / seconds,
        "psnr_vs_dense": sum(frame_psnr(f[generated], d[generated]) for f, d, _ in pairs) / len(pairs),
        "min_psnr_vs_dense": min(frame_psnr(f[generated], d[generated]) for f, d, _ in pairs),
        "worst_frame_psnr_vs_dense": min(psnr(a, b) for f, d, _ in pairs for a, b in zip(f[generated], d[generated])),
        "ssim_vs_dense": sum(ssim(f[generated], d[generated]) for f, d, _ in pairs) / len(pairs),
        "psnr_vs_truth": sum(frame_psnr(f[generated], c.frames[:len(f)][generated]) for f, _, c in pairs) / len(pairs),
        "cache_hits": hits, "memory_frames_pruned": pruned, "time_s": seconds,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, row in result["settings"].items():
        ax.scatter(row["speedup"], row["psnr_vs_dense"], color="tab:blue")
        ax.annotate(label, (row["speedup"], row["psnr_vs_dense"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.axhline(30, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="speedup over dense (eager, CPU)", ylabel="PSNR vs dense (dB)",
           title="trained world: fidelity against speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, per_trajectory=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated labels of SETTINGS")
    parser.add_argument("--out", type=Path, default=Path("out/tradeoff"))
    args = parser.parse_args()
    world, codec, cases = trained_world_and_cases(args, REVISIT_TRAJECTORIES)
    spec = world.spec
    dense, dense_s = [], 0.0
    with torch.no_grad():
        rollout(world, codec, cases[0], DensePolicy(spec.window, spec.memory))  # warm-up, not timed
        for case in cases:
            out, s = timed(lambda: rollout(world, codec, case, DensePolicy(spec.window, spec.memory)))
            dense.append(out)
            dense_s += s
    generated = slice(spec.chunk_frames, None)
    result: dict[str, Any] = {
        "cases": [f"{c.trajectory.name}/{c.scene_seed}" for c in cases], "frames": args.frames,
        "dense_time_s": dense_s,
        "dense_psnr_vs_truth": sum(frame_psnr(d[generated], c.frames[:len(d)][generated])
                                   for d, c in zip(dense, cases)) / len(cases),
        "settings": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for label in args.settings.split(","):
        row = measure(world, codec, cases, SETTINGS[label], dense, dense_s)
        result["settings"][label] = row
        print(f"{label:>14}: speedup {row['speedup']:.2f}x  PSNR vs dense {row['psnr_vs_dense']:.1f} dB "
              f"(worst case {row['min_psnr_vs_dense']:.1f}, worst frame {row['worst_frame_psnr_vs_dense']:.1f})  vs truth {row['psnr_vs_truth']:.2f} dB "
              f"(dense {result['dense_psnr_vs_truth']:.2f})  hits {row['cache_hits']}  pruned {row['memory_frames_pruned']}",
              flush=True)
        (args.out / "tradeoff.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "tradeoff.png")


if __name__ == "__main__":
    main()
