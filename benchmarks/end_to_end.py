"""End to end on the GPU: light_interaction against the Inductor-compiled dense world, with ablations.

For one reference world (``--world``) at one preset, along a trajectory with revisits, it times
the dense baseline (``torch.compile`` with Inductor, upstream's fixed context) and the backend with
every component on and with one component at a time:

    all       context controller + denoising cache + block-sparse attention (the defaults)
    context   memory pruning, adaptive window and compact context buckets only
    cache     the denoising cache only (early steps of revisited chunks reused)
    sparse    block-sparse attention only (plans from the controller, context kept whole)
    all_topk  all, plus top-k block selection at density 0.5 (``sparsity.density``; opt-in, run it
              with ``--ablations all,all_topk``)

and writes a JSON (per run: total time, speedup, peak GPU memory, decisions, PSNR/SSIM against the
dense run, recompilations after warm-up) and a bar plot. The per-component time breakdown is the
ablation: what each component alone saves against dense. Run it as::

    python benchmarks/end_to_end.py --world hy_worldplay --preset full --depth 8 --chunks 12 --out out/e2e

``--preset trained`` (HY) runs the world trained on rendered rooms from the true first chunk of a
held-out room and adds PSNR/SSIM of dense and of each run against the renderer's ground truth.

``--depth`` keeps the preset's width, heads, tokens per frame and context, and cuts the number of
DiT blocks (every block costs the same, so time per chunk scales with depth and the speedup does
not depend on it); use it to fit a long trajectory into a short GPU session.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.report_tools import (
    chunk_rows,
    dense_setup,
    ground_truth,
    light_interaction_setup,
    summarize,
    timed_run,
)

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}
ABLATIONS: dict[str, dict[str, Any]] = {
    "all": {},
    "context": {"cache": {"enabled": False}, "sparsity": {"enabled": False}},
    "cache": {"context": {"enabled": False}, "sparsity": {"enabled": False}},
    "sparse": {"context": {"enabled": False}, "cache": {"enabled": False}},
    "all_topk": {"sparsity": {"density": 0.5}},  # opt-in: top-k blocks within every plan
}
DEFAULT_ABLATIONS = "all,context,cache,sparse"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="hy_worldplay")
    parser.add_argument("--preset", default="full", choices=hy_worldplay.PRESET_NAMES,
                        help="'trained' (HY only): the world trained on rendered rooms, also scored against ground truth")
    parser.add_argument("--depth", type=int, default=None, help="DiT blocks (default: the preset's)")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--trajectory", default="loop", choices=sorted(trajectories.TRAJECTORIES))
    parser.add_argument("--ablations", default=DEFAULT_ABLATIONS, help="comma-separated subset of " + ",".join(ABLATIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/end_to_end"))
    return parser.parse_args()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def main() -> None:
    args = parse_args()
    module = WORLDS[args.world]
    if args.preset not in module.PRESET_NAMES:
        raise SystemExit(f"--preset {args.preset} is not a preset of {args.world} ({', '.join(module.PRESET_NAMES)})")
    if args.preset == hy_worldplay.TRAINED:
        if args.depth is not None:
            raise SystemExit("--depth does not apply to the trained preset (its weights fix the depth)")
        world = module.build(args.preset, device=args.device)
    else:
        spec = module.PRESETS[args.preset]
        if args.depth is not None:
            spec = dataclasses.replace(spec, depth=args.depth)
        world = module.build(spec, device=args.device, seed=args.seed)
    spec = world.spec
    trajectory = trajectories.make(args.trajectory, args.chunks * spec.chunk_frames, seed=args.seed,
                                   chunk_frames=spec.chunk_frames)
    truth, prefix = ground_truth(args.preset, world, trajectory, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "world": spec.name, "depth": spec.depth, "chunks": args.chunks, "trajectory": args.trajectory,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "tokens_per_frame": spec.tokens_per_frame, "context_frames": spec.context_frames, "runs": {},
    }
    print(f"{spec.name} depth {spec.depth}: {args.chunks} chunks, {spec.tokens_per_frame} tokens/frame, "
          f"context {spec.context_frames} frames, trajectory {args.trajectory}", flush=True)

    torch._dynamo.reset()
    _peak_reset(args.device)
    start = time.perf_counter()
    dense = timed_run(dense_setup(world), trajectory, args.chunks, args.seed, prefix)
    record["dense"] = {"time_s": sum(dense.generation.chunk_times), "peak_gb": _peak_gb(args.device),
                       "wall_s": time.perf_counter() - start, "recompiles_after_warmup": dense.recompiles}
    print(f"dense: {record['dense']['time_s']:.2f} s, peak {record['dense']['peak_gb']} GB", flush=True)
    _write(args.out, record)

    for name in args.ablations.split(","):
        torch._dynamo.reset()  # every ablation compiles afresh (and stays under Dynamo's recompile limit)
        _peak_reset(args.device)
        start = time.perf_counter()
        light = timed_run(light_interaction_setup(world, ABLATIONS[name]), trajectory, args.chunks, args.seed, prefix)
        rows = chunk_rows(dense, light)
        summary = summarize(rows, dense, light, truth)
        record["runs"][name] = {**summary, "peak_gb": _peak_gb(args.device), "wall_s": time.perf_counter() - start,
                                "per_chunk": rows}
        print(f"{name}: {summary['time_li_s']:.2f} s, speedup {summary['speedup']:.2f}x, "
              f"PSNR {summary['psnr_db_vs_dense']:.1f} dB (min {summary['min_psnr_db']:.1f}), "
              f"hits {summary['cache_hits']}, pruned {summary['memory_frames_pruned']}, "
              f"density {summary['attention_density_mean']:.2f}, peak {record['runs'][name]['peak_gb']} GB, "
              f"recompiles {summary['recompiles_after_warmup']}, attention fallbacks {summary['attention_fallbacks']}, "
              f"kernel autotunes {summary['kernel_autotunes_after_warmup']}", flush=True)
        if truth is not None:
            print(f"  vs ground truth: PSNR dense {summary['psnr_db_dense_vs_truth']:.2f} dB, {name} "
                  f"{summary['psnr_db_li_vs_truth']:.2f} dB, repeat-last {summary['psnr_db_repeat_last_vs_truth']:.2f} dB",
                  flush=True)
        _write(args.out, record)
    _plot(record, args.out / f"{spec.name.replace('/', '_')}.png")


def _write(out: Path, record: dict[str, Any]) -> None:
    """The JSON after every run, so a run cut short keeps what it measured."""
    name = record["world"].replace("/", "_")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))


def _plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["dense", *record["runs"]]
    times = [record["dense"]["time_s"], *(r["time_li_s"] for r in record["runs"].values())]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, times, color=["grey"] + ["tab:blue"] * len(record["runs"]))
    for bar, t in zip(bars, times):
        ax.annotate(f"{times[0] / t:.2f}x", (bar.get_x() + bar.get_width() / 2, t), ha="center", va="bottom")
    ax.set(ylabel=f"seconds for {record['chunks']} chunks",
           title=f"{record['world']} (depth {record['depth']}) on {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
