"""End to end on the GPU: light_interaction against the Inductor-compiled dense world, with ablations.

For one reference world (``--world``) at one preset, along a trajectory with revisits, it times
the dense baseline (``torch.compile`` with Inductor, upstream's fixed context) and the backend with
every component on and with one component at a time:

    all       context controller + denoising cache + block-sparse attention, context rows reused
              between steps (the defaults)
    context   memory pruning, adaptive window and compact context buckets only
    cache     the denoising cache only (early steps of revisited chunks reused)
    sparse    block-sparse attention only (plans from the controller, context kept whole)
    all_topk  all, plus top-k block selection at density 0.5 (``sparsity.density``; opt-in, run it
              with ``--ablations all,all_topk``)
    all_blend all, with revisited frames served the score-weighted blend of every matching past
              frame (``cache.serve="blend"``) instead of the best match (opt-in)
    all_reuse_rows  all, with ``context.reuse_rows="auto"`` set explicitly (today's default; the
              rows measured before it became the default name it)
    all_no_reuse_rows  all, with the context rows computed at every step (``context.reuse_rows=False``)
    all_row_blocks  all, with the blocks run on the chunk's rows alone where the context rows are
              reused (``context.row_blocks``, opt-in; with ``--blocks`` only)

and writes a JSON per world (per run: total time, speedup, peak GPU memory, decisions, PSNR/SSIM
against the dense run, recompilations after warm-up) with a bar plot, and one row per (world, preset,
depth, trajectory, run) into ``--summary`` (default ``benchmarks/results/e2e_summary.json``, rows of
other keys kept): the file the README's tables are made from. The per-component time breakdown is
the ablation: what each component alone saves against dense. Run it as::

    python benchmarks/end_to_end.py --world hy_worldplay --preset full --depth 8 --chunks 12 \
        --trajectories loop,out_and_back,random_walk_with_returns --out out/e2e

``--preset trained`` and ``--preset trained_ar`` (HY) run a world trained on rendered rooms from the
true first chunk of a held-out room and add PSNR/SSIM of dense and of each run against the
renderer's ground truth. ``--form full|cached`` picks the sequence form: ``full`` re-runs the
context with the chunk at every step (HY's bidirectional form; Matrix-Game's upstream form, its
default), ``cached`` fills a KV cache from the context once per chunk (HY's block-causal worlds, which
``trained_ar`` deploys; Matrix-Game's KV-cache form). Given, the rows' world names it.

``--calibrate 0.99`` calibrates the tile plans (``li_compile.calibrate``) on the trajectory's first
two chunks before each light_interaction run (untimed; the runs are named ``<run>_cal`` and their
JSON keeps the calibration's table). ``--options JSON --options-name NAME`` merges options into
every light_interaction run (e.g. smaller blocks, or ``max_density`` 1 to apply every plan); the runs
are named ``<run>@NAME``.

Both runs compile regionally by default (each repeated block once, ``li_compile.regions``; the dense
run through ``regional_inductor``); ``--whole`` compiles the unrolled model in both.
``--nested-blocks`` also has Dynamo trace one block for all of them in both runs
(``li_compile.nest_repeated_blocks``); its runs are named ``<run>@nested``. ``--blocks`` compiles
only the repeated blocks in both runs, the top level eager (``li_compile.compile_repeated_blocks``
with the model behind ``li_compile.cached``; the dense run's blocks with Inductor); its runs are
named ``<run>@blocks``.

``--depth`` keeps the preset's width, heads, tokens per frame and context, and cuts the number of
DiT blocks (every block costs the same, so time per chunk scales with depth and the speedup does
not depend on it); use it to fit a long trajectory into a short GPU session.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from li_compile.repeated_blocks import nest_repeated_blocks
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
    "all_blend": {"cache": {"serve": "blend"}},  # opt-in: revisited frames served the blend of every match
    "all_dense_context": {"sparsity": {"context_queries": "dense"}},  # full form: context rows dense (the default)
    "all_frame_local": {"sparsity": {"context_queries": "frame_local"}},  # opt-in: context rows frame-local
    "all_camera_context": {"sparsity": {"context_queries": "camera"}},  # opt-in: context rows from their own cameras
    "all_reuse_rows": {"context": {"reuse_rows": "auto"}},  # the default, set explicitly
    "all_no_reuse_rows": {"context": {"reuse_rows": False}},  # context rows computed at every step
    "all_row_blocks": {"context": {"row_blocks": True}},  # opt-in: blocks on the chunk's rows at reused steps
}
DEFAULT_ABLATIONS = "all,context,cache,sparse"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="hy_worldplay")
    parser.add_argument("--preset", default="full", choices=hy_worldplay.PRESET_NAMES,
                        help="'trained' (HY only): the world trained on rendered rooms, also scored against ground truth")
    parser.add_argument("--depth", type=int, default=None, help="DiT blocks (default: the preset's)")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--trajectories", default="loop",
                        help="comma-separated names from " + ",".join(sorted(trajectories.TRAJECTORIES)))
    parser.add_argument("--ablations", default=DEFAULT_ABLATIONS, help="comma-separated subset of " + ",".join(ABLATIONS))
    parser.add_argument("--form", choices=sorted(set(hy_worldplay.FORMS) | set(matrix_game3.FORMS)), default=None,
                        help="full (context and chunk in one sequence at every step: HY's bidirectional form, "
                             "Matrix-Game's upstream form and default) or cached (the context's KV once per "
                             "chunk: HY's block-causal worlds, Matrix-Game's KV-cache form); default: the "
                             "world's own; given, the rows' world names it")
    parser.add_argument("--calibrate", type=float, default=None, metavar="TARGET",
                        help="calibrate the tile plans to keep TARGET of the attention mass (li_compile.calibrate) on "
                             "the trajectory's first chunks before each light_interaction run; runs are named <run>_cal")
    parser.add_argument("--options", type=json.loads, default=None, metavar="JSON",
                        help="options merged into every light_interaction run's (per section, over the ablation's), "
                             "e.g. '{\"sparsity\": {\"block_q\": 32}}'; needs --options-name")
    parser.add_argument("--options-name", default=None,
                        help="what --options are called: runs are named <run>@<name> in the summary")
    parser.add_argument("--whole", action="store_true",
                        help="compile the unrolled model in both runs (default: each repeated block once, li_compile.regions)")
    parser.add_argument("--blocks", action="store_true",
                        help="compile only the repeated blocks in both runs, the top level eager")
    parser.add_argument("--nested-blocks", action="store_true",
                        help="both runs: Dynamo traces one block for all (li_compile.nest_repeated_blocks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/end_to_end"))
    parser.add_argument("--summary", type=Path, default=Path("benchmarks/results/e2e_summary.json"))
    args = parser.parse_args()
    if (args.options is None) != (args.options_name is None):
        parser.error("--options and --options-name go together: the name keeps those runs apart in the summary")
    unknown = sorted(set(args.trajectories.split(",")) - set(trajectories.TRAJECTORIES))
    if unknown:
        parser.error(f"unknown trajectories {unknown}; choose from {sorted(trajectories.TRAJECTORIES)}")
    return args


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
    if args.preset in (hy_worldplay.TRAINED, hy_worldplay.TRAINED_AR):
        if args.depth is not None:
            raise SystemExit("--depth does not apply to the trained preset (its weights fix the depth)")
        world = module.build(args.preset, device=args.device, form=args.form)
    else:
        spec = module.PRESETS[args.preset]
        if args.depth is not None:
            spec = dataclasses.replace(spec, depth=args.depth)
        world = module.build(spec, device=args.device, seed=args.seed, form=args.form)  # None: the world's own
    if args.nested_blocks and not nest_repeated_blocks(world.model):
        raise SystemExit(f"--nested-blocks: {type(world.model).__name__} has no list of repeated blocks")
    for name in args.trajectories.split(","):
        run_trajectory(args, world, name)


def run_trajectory(args: argparse.Namespace, world, name: str) -> None:
    """Dense and every ablation along trajectory ``name``: the world's JSON, plot and summary rows."""
    spec = world.spec
    trajectory = trajectories.make(name, args.chunks * spec.chunk_frames, seed=args.seed, chunk_frames=spec.chunk_frames)
    truth, prefix = ground_truth(args.preset, world, trajectory, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "world": world_label(spec.name, args.form), "preset": args.preset,
        "depth": spec.depth, "chunks": args.chunks, "trajectory": name,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__, "commit": _commit(),
        "tokens_per_frame": spec.tokens_per_frame, "context_frames": spec.context_frames,
        "regional": not args.whole, "nested_blocks": args.nested_blocks, "blocks_only": args.blocks, "runs": {},
    }
    print(f"{record['world']} depth {spec.depth}: {args.chunks} chunks, {spec.tokens_per_frame} tokens/frame, "
          f"context {spec.context_frames} frames, trajectory {name}", flush=True)

    torch._dynamo.reset()
    _peak_reset(args.device)
    start = time.perf_counter()
    dense = timed_run(dense_setup(world, regional=not args.whole, blocks=args.blocks), trajectory, args.chunks,
                      args.seed, prefix)
    record["dense"] = {"time_s": sum(dense.generation.chunk_times), "peak_gb": _peak_gb(args.device),
                       "wall_s": time.perf_counter() - start, "warmup_s": dense.warmup_s,
                       "recompiles_after_warmup": dense.recompiles}
    print(f"dense: {record['dense']['time_s']:.2f} s, warm-up {dense.warmup_s:.1f} s, "
          f"peak {record['dense']['peak_gb']} GB", flush=True)
    _write(args.out, record)

    for ablation in args.ablations.split(","):
        torch._dynamo.reset()  # every ablation compiles afresh (and stays under Dynamo's recompile limit)
        _peak_reset(args.device)
        start = time.perf_counter()
        options = {**merged_options(ABLATIONS[ablation], args.options or {}), "regional": not args.whole}
        light = timed_run(light_interaction_setup(world, options, blocks=args.blocks), trajectory, args.chunks,
                          args.seed, prefix, calibrate=args.calibrate)
        rows = chunk_rows(dense, light)
        summary = summarize(rows, dense, light, truth)
        run = ablation if args.calibrate is None else f"{ablation}_cal"
        run = run if args.options_name is None else f"{run}@{args.options_name}"
        run = f"{run}@nested" if args.nested_blocks else run
        run = f"{run}@blocks" if args.blocks else run
        record["runs"][run] = {**summary, "peak_gb": _peak_gb(args.device), "wall_s": time.perf_counter() - start,
                               "warmup_s": light.warmup_s, "warmup_kernel_s": light.warmup_kernel_s,
                               "per_chunk": rows}
        if light.calibration is not None:
            record["runs"][run]["calibration"] = {"target": args.calibrate, "seconds": light.calibration_s,
                                                  "table": light.calibration.table()}
            print(light.calibration.table(), flush=True)
        print(f"{run}: {summary['time_li_s']:.2f} s, speedup {summary['speedup']:.2f}x, "
              f"PSNR {summary['psnr_db_vs_dense']:.1f} dB (min {summary['min_psnr_db']:.1f}, "
              f"worst frame {summary['min_frame_psnr_db']:.1f}), "
              f"hits {summary['cache_hits']} (near {summary['cache_near_hits']}), "
              f"context rows reused {summary['context_rows_reused']}, "
              f"blocks on the chunk's rows {summary['row_blocks_calls']}, "
              f"pruned {summary['memory_frames_pruned']}, "
              f"density {summary['attention_density_mean']:.2f}, peak {record['runs'][run]['peak_gb']} GB, "
              f"warm-up {light.warmup_s:.1f} s (kernel first launches {light.warmup_kernel_s:.1f} s), "
              f"recompiles {summary['recompiles_after_warmup']}, "
              f"attention fallbacks {summary['attention_fallbacks']}, "
              f"kernel autotunes {summary['kernel_autotunes_after_warmup']}", flush=True)
        if truth is not None:
            print(f"  vs ground truth: PSNR dense {summary['psnr_db_dense_vs_truth']:.2f} dB, {run} "
                  f"{summary['psnr_db_li_vs_truth']:.2f} dB, repeat-last {summary['psnr_db_repeat_last_vs_truth']:.2f} dB",
                  flush=True)
        _write(args.out, record)
        _add_summary_row(args.summary, record, run)
    _plot(record, args.out / f"{_file_stem(record)}.png")


def merged_options(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` compile options with ``extra``'s over them, section by section (``{"sparsity": {...}}``
    merges into base's ``sparsity``, except a section ``base`` disables: the ablation turns it off,
    and its other options cannot act); top-level values of ``extra`` replace base's."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and merged.get(key, {}).get("enabled") is False:
            continue
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


SUMMARY_KEY = ("world", "preset", "depth", "trajectory", "run")
SUMMARY_FIELDS = ("speedup", "time_dense_s", "time_li_s", "psnr_db_vs_dense", "min_psnr_db", "min_frame_psnr_db",
                  "recompiles_after_warmup", "cache_hits", "cache_near_hits", "context_rows_reused", "row_blocks_calls",
                  "memory_frames_pruned", "attention_density_mean", "chunks")
TRUTH_FIELDS = ("psnr_db_dense_vs_truth", "psnr_db_li_vs_truth", "psnr_db_repeat_last_vs_truth")  # trained worlds


def _add_summary_row(path: Path, record: dict[str, Any], run: str) -> None:
    """Put the row of ``run`` into the summary file, replacing a row with the same key."""
    result, dense = record["runs"][run], record["dense"]
    row = {
        "world": record["world"], "preset": record["preset"], "depth": record["depth"], "trajectory": record["trajectory"],
        "run": run, **{k: result[k] for k in SUMMARY_FIELDS}, **{k: result[k] for k in TRUTH_FIELDS if k in result},
        "peak_gb": result["peak_gb"], "peak_gb_dense": dense["peak_gb"],
        "warmup_s_dense": dense["warmup_s"], "warmup_s_li": result["warmup_s"],
        "warmup_kernel_s_li": result["warmup_kernel_s"], "regional": record["regional"],
        "nested_blocks": record["nested_blocks"], "blocks_only": record["blocks_only"], "device": record["device"],
        "torch": record["torch"], "commit": record["commit"],
    }
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if tuple(r.get(k) for k in SUMMARY_KEY) != tuple(row[k] for k in SUMMARY_KEY)] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(rows, key=lambda r: tuple(str(r[k]) for k in SUMMARY_KEY)), indent=1))


def world_label(name: str, form: str | None) -> str:
    """A summary row's ``world``: the preset's ``name``, with the sequence form where ``--form`` named one."""
    return name if form is None else f"{name} ({form} form)"


def _commit() -> str:
    """The commit measured: ``LI_COMMIT`` (set where the checkout has no git), else ``git rev-parse``,
    marked ``+changes`` where tracked files differ from it (a copied working tree whose git history is
    older than its files, as on the device machine, names the commit its history ends at)."""
    if os.environ.get("LI_COMMIT"):
        return os.environ["LI_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+changes" if changed else head


def _write(out: Path, record: dict[str, Any]) -> None:
    """The JSON after every run, so a run cut short keeps what it measured."""
    (out / f"{_file_stem(record)}.json").write_text(json.dumps(record, indent=2))


def _file_stem(record: dict[str, Any]) -> str:
    """``<world>_d<depth>_<trajectory>`` with only letters, digits and underscores."""
    stem = f"{record['world']}_d{record['depth']}_{record['trajectory']}"
    return "".join(c if c.isalnum() else "_" for c in stem).replace("__", "_")


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
           title=f"{record['world']} (depth {record['depth']}, {record['trajectory']}) on {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
