"""What the examples share: flags, the dense-vs-light_interaction comparison, metrics, table, plots.

``examples/hy_worldplay.py`` and ``examples/matrix_game3.py`` call ``run_example(world_module)``:
build the reference world, generate a trajectory with revisits twice (dense: ``torch.compile`` with
Inductor; and ``backend="light_interaction"``), print a per-chunk table and a summary, and write
plots (``--out``) and a JSON summary (``--json``).

``light_interaction_setup`` is the one place that decides how the light_interaction run is driven
(the model's accelerator, configured per trajectory, and per-chunk statistics).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import li_compile
from li_compile.block_compile import compile_blocks_in_place
from li_compile.context_rows import PROBED
from li_compile.controller.attention_plan import frame_drop_layout, padded_context_keep
from li_compile.kernels.block_layout import BlockLayout
from li_compile.kernels.block_sparse_attention import first_launch_seconds, launched_shapes
from li_compile.regions import REGION_COUNTER, regional_inductor
from li_compile.specialize import SPECIALIZE_COUNTER
from li_compile.reporting import ChunkStats
from li_compile.controller.selection import ContextSelection
from li_compile.options import Options
from li_compile.worlds import trajectories
from li_compile.worlds.base import World
from li_compile.worlds.hy_worldplay import TRAINED, TRAINED_AR
from li_compile.worlds.pipeline import (
    ContextPolicy, DensePolicy, Generation, generate, progress_bar, unmasked_capacity, warm_up,
)

CALIBRATION_CHUNKS = 2  # chunks ``timed_run(calibrate=...)`` calibrates on
PSNR_CAP_DB = 100.0  # PSNR of identical pictures (finite, so the JSON stays valid)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # the usual Gaussian window of SSIM
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # SSIM stabilisers for pictures in [0, 1]


# --- flags ------------------------------------------------------------------------------------


def parse_args(description: str, default_trajectory: str, argv: Sequence[str] | None = None,
               presets: Sequence[str] = ("tiny", "small", "full"), forms: Sequence[str] = ()) -> argparse.Namespace:
    """The examples' flags: ``--preset [--form] --device --chunks --trajectory --seed --options --calibrate --blocks
    --out --json`` (``--form`` where the world has ``forms``);
    ``--options`` is the backend's ``options=`` dict as JSON, checked as the backend checks it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="tiny", choices=presets)
    if forms:
        parser.add_argument("--form", default=None, choices=forms, help="the world's sequence form (default: its own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunks", type=int, default=16, help="chunks to generate (default 16)")
    parser.add_argument("--trajectory", default=default_trajectory, choices=sorted(trajectories.TRAJECTORIES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the noise and the trajectory")
    parser.add_argument("--options", type=_backend_options, default={},
                        help='backend options as JSON, e.g. \'{"context": {"keep_threshold": 0.3}}\'')
    parser.add_argument("--calibrate", type=float, default=None, metavar="TARGET",
                        help="calibrate the tile plans on the first chunks to keep TARGET (e.g. 0.99) of the "
                             "attention mass (li_compile.calibrate) and print the recall per layer")
    parser.add_argument("--blocks", action="store_true",
                        help="compile only the repeated blocks in both runs (li_compile.compile_repeated_blocks: the "
                             "shortest warm-up, and what context.row_blocks needs)")
    parser.add_argument("--out", type=Path, default=None, help="folder for plots and pictures")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON to this file")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error(f"--chunks must be >= 1, got {args.chunks}")
    return args


def _backend_options(text: str) -> dict[str, Any]:
    """``--options``: a JSON object that ``Options.from_user`` accepts (argparse reports the error)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    try:
        Options.from_user(options)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return options


# --- metrics ------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of pictures in [0, 1] (any equal shapes), capped at ``PSNR_CAP_DB``."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(1.0 / mse))


def frame_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over frames of the per-frame PSNR (dB) of ``(N, 3, H, W)`` pictures in [0, 1]."""
    return sum(psnr(p, t) for p, t in zip(pred, target)) / len(pred)


def repeat_last(truth: torch.Tensor, given: int, stop: int | None = None) -> torch.Tensor:
    """The trivial predictor scored against world models: the last given frame ``truth[given - 1]``
    repeated over frames ``[given, stop)`` (default: to the end of ``truth``)."""
    stop = len(truth) if stop is None else stop
    return truth[given - 1].expand(stop - given, *truth.shape[1:]).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of RGB pictures ``(N, 3, H, W)`` in [0, 1] (Gaussian window 11, sigma 1.5)."""
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float32) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, padding=SSIM_WINDOW // 2, groups=a.shape[1])

    a, b = a.float(), b.float()
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return (num / den).mean().item()


# Graphs Dynamo may keep of one function (``recompile_limit``, default 8): every run of a process
# compiles the same model forward, dense with 2 graphs (padded, full), a light_interaction run with
# one per capacity bucket and one more (full) at the largest; past the limit Dynamo would run the forward eagerly, silently.
GRAPHS_PER_FUNCTION = 64
BLOCKS_AT_LEAST = 2  # the runs that compile only the blocks do so from this many (the tiny presets have 2)

# --- the two runs ----------------------------------------------------------------------------------


@dataclass
class Driver:
    """What drives one generation along one trajectory: a dense context policy or a configured
    accelerator (``generate``'s ``policy`` / ``accelerator``), and the statistics of each chunk
    afterwards (``chunk_stats(chunk, selection)`` -> dict with ``memory_kept``, ``memory_pruned``,
    ``density``, ``cache_hits``, ``fallbacks``)."""

    policy: ContextPolicy | None
    accelerator: li_compile.Accelerator | None
    chunk_stats: Callable[[int, ContextSelection], dict[str, float]]


@dataclass
class Setup:
    """How one run is driven: the compiled world, a fresh ``Driver`` per trajectory, and the context
    warm-up (``warm_up()``: model calls at every context capacity the run may ask for, so every
    graph compiles, and every kernel autotunes, before the trajectory is timed). On CUDA both runs
    drop the key-padding mask of a context that fills the largest capacity (``mask_full``,
    ``pipeline.unmasked_capacity``), as a runner with a full context would, so SDPA may use its
    flash kernel: that capacity has a padded and a full graph, the others one, all warmed up."""

    world: World
    driver: Callable[[trajectories.Trajectory], Driver]
    warm_up: Callable[[], None]


def full_context_masked(world: World) -> bool:
    """Whether a full context keeps its key-padding mask in the timed runs (``generate``'s
    ``mask_full``): not on CUDA, where an unmasked SDPA call may take the flash kernel; elsewhere
    yes, since the CPU kernels gain little and a second graph per capacity costs compile time."""
    return world.device.type != "cuda"


def dense_stats(chunk: int, selection: ContextSelection) -> dict[str, float]:
    """Statistics of a dense chunk: every selected memory frame kept, attention dense, no cache."""
    return {"memory_kept": len(selection.memory), "memory_pruned": 0, "density": 1.0, "cache_hits": 0}


def dense_setup(world: World, regional: bool = True, blocks: bool = False) -> Setup:
    """The baseline: ``torch.compile`` with Inductor and upstream's ``DensePolicy``; ``regional``:
    each repeated block compiled once (``li_compile.regions.regional_inductor``), as the
    light_interaction run compiles by default; ``blocks``: only the repeated blocks compiled, each
    in place (``module.compile``, PyTorch's regional compilation), the top level eager, on a copy of
    the model sharing its weights (as ``light_interaction_setup(..., blocks=True)``)."""
    spec = world.spec
    if blocks:
        model = sharing_weights(world.model)
        compile_blocks_in_place(model, BLOCKS_AT_LEAST, backend="inductor", dynamic=False)
        compiled = world.with_model(model)
    else:
        backend = regional_inductor if regional else "inductor"
        compiled = world.compile(partial(torch.compile, backend=backend, dynamic=False))

    def driver(trajectory: trajectories.Trajectory) -> Driver:
        return Driver(DensePolicy(spec.window, spec.memory), None, dense_stats)

    return Setup(compiled, driver, partial(warm_up, compiled, (spec.context_frames,), full_context_masked(world)))


def light_interaction_options(world: World, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The backend options of a reference world's run: the user's, on top of the world's own context
    sizes (the controller's window range ends at the dense window, so keeping everything is dense)."""
    user = dict(options or {})
    context = {"window_max": world.spec.window, "window_min": min(world.spec.window, 1), **user.get("context", {})}
    return {**user, "context": context}


def configure_for(accelerator: li_compile.Accelerator, world: World, trajectory: trajectories.Trajectory) -> None:
    """Tell ``accelerator`` (of ``world.model``) the world's memory, token layout and revisit inputs,
    and the trajectory's lens."""
    accelerator.configure(memory_k=world.spec.memory, fov_y_deg=trajectory.fov_y_deg, aspect=trajectory.aspect,
                          layout=world.layout, revisit_inputs=world.revisit_inputs)


def light_interaction_setup(world: World, options: Mapping[str, Any] | None = None,
                            dynamic: bool | None = False, blocks: bool = False) -> Setup:
    """The light_interaction run: the world compiled with the backend; per chunk, its model's
    accelerator selects the context (memory pruning, adaptive window, compact context buckets),
    writes the attention plan and serves early steps of revisited chunks from its cache.
    ``dynamic=False`` (default): each context capacity gets its own static graph; ``None``: Dynamo
    makes the context length symbolic at the second capacity, and the backend specializes that graph
    per capacity (``li_compile.specialize``). ``blocks``: only the repeated blocks compiled
    (``li_compile.compile_repeated_blocks``) on a copy of the model sharing its weights, the model
    behind the cache at its call boundary (``li_compile.cached``, arguments ``x`` and ``sigma``)."""
    user = light_interaction_options(world, options)
    if blocks:
        model = li_compile.compile_repeated_blocks(sharing_weights(world.model), user, dynamic=dynamic,
                                                   min_blocks=BLOCKS_AT_LEAST)
        compiled = world.with_model(model, li_compile.cached(model, latent="x", timestep="sigma"))
    else:
        compiled = world.compile(
            lambda m: torch.compile(m, backend="light_interaction", options=user, dynamic=dynamic)
        )
    accelerator = li_compile.accelerator(compiled.model)

    def driver(trajectory: trajectories.Trajectory) -> Driver:
        configure_for(accelerator, world, trajectory)
        accelerator.reset()  # a run never reuses what another run stored

        def chunk_stats(chunk: int, selection: ContextSelection) -> dict[str, float]:
            values = _stats_of(accelerator.report().chunks, chunk)
            return {"memory_kept": values.get("memory_kept", 0), "memory_pruned": values.get("memory_dropped", 0),
                    "density": values.get("density", 1.0), "cache_hits": values.get("cache_hits", 0),
                    "cache_near_hits": values.get("cache_near_hits", 0),
                    "context_rows_reused": values.get("context_rows_reused", 0),
                    "context_rows_off": values.get("context_rows_off", ""),
                    "row_blocks_calls": values.get("row_blocks_calls", 0),
                    "row_blocks_off": values.get("row_blocks_off", ""),
                    "fallbacks": sum(values.get("fallbacks", {}).values())}

        return Driver(None, accelerator, chunk_stats)

    def warm_up_buckets() -> None:
        configure_for(accelerator, world, trajectories.make("loop", world.spec.chunk_frames))
        unmasked = unmasked_capacity(compiled, accelerator)
        accelerator.warm_up(lambda capacity: warm_up(compiled, (capacity,), full_context_masked(world), unmasked))

    return Setup(compiled, driver, warm_up_buckets)


def sharing_weights(module: nn.Module) -> nn.Module:
    """A copy of ``module`` holding ``module``'s own parameters and buffers (its structure copied: what
    is compiled in place in the copy leaves ``module`` as it was)."""
    same = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, same)


def _stats_of(stats: Sequence[ChunkStats], chunk: int) -> dict[str, Any]:
    """The values recorded for ``chunk`` (empty when the chunk never reached the recorder, e.g. a
    chunk given rather than generated)."""
    return next((s.values for s in stats if s.chunk == chunk), {})


@dataclass
class Run:
    """A timed generation: the result, per-chunk statistics, and compilations during the timed run
    (Dynamo frames, and new call shapes of the block-sparse kernel: on the GPU each one autotunes)."""

    generation: Generation
    stats: list[dict[str, float]]
    recompiles: int
    kernel_autotunes: int = 0
    warmup_s: float = 0.0
    calibration: li_compile.Calibration | None = None  # ``timed_run(calibrate=...)``'s result
    calibration_s: float = 0.0
    warmup_kernel_s: float = 0.0  # of ``warmup_s``: the block-sparse kernel's first launches (GPU: autotuning)


def ground_truth(preset: str, world: World, trajectory: trajectories.Trajectory, seed: int
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For the trained presets, whose rooms the renderer draws: the true frames along ``trajectory``
    and chunk 0's clean latents (runs start from them: ``timed_run(..., prefix)``); else
    ``(None, None)``."""
    if preset not in (TRAINED, TRAINED_AR):
        return None, None
    from li_compile.worlds.fidelity import trained_truth  # fidelity builds on this module

    return trained_truth(world, trajectory, seed)


def timed_run(setup: Setup, trajectory: trajectories.Trajectory, chunks: int, seed: int,
              prefix: torch.Tensor | None = None, calibrate: float | None = None,
              calibrate_chunks: int = CALIBRATION_CHUNKS) -> Run:
    """Warm up (model calls at every context capacity: compiles), then generate ``chunks`` chunks
    (a full context unmasked on CUDA, see ``Setup``) and count the frames Dynamo and the regions
    ``li_compile.regions`` compiled while they ran (with Dynamo's recompile limit raised to
    ``GRAPHS_PER_FUNCTION``). ``prefix``: clean latents chunk 0 comes out as (a run compared with ground truth starts from the true first chunk,
    ``fidelity.prefix_hook``). ``calibrate``: a kept-mass target; before the timed run, the first
    ``calibrate_chunks`` chunks of the trajectory calibrate the tile plans (``li_compile.calibrate``;
    untimed, as a user would calibrate once and reload), then the cache and statistics are reset."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_FUNCTION)
    start, kernel_before = time.perf_counter(), first_launch_seconds()
    setup.warm_up()
    warmup_s, warmup_kernel_s = time.perf_counter() - start, first_launch_seconds() - kernel_before
    driver = setup.driver(trajectory)
    step_hook = None
    if prefix is not None:
        from li_compile.worlds.fidelity import prefix_hook  # fidelity builds on this module

        step_hook = prefix_hook(setup.world, prefix, seed)
    mask_full = full_context_masked(setup.world)
    calibration, calibration_s = None, 0.0
    if calibrate is not None:
        if driver.accelerator is None:
            raise ValueError("calibrate applies to a light_interaction setup, not the dense baseline")
        start = time.perf_counter()
        with driver.accelerator.calibrate(calibrate) as scope:
            generate(setup.world, trajectory, None, calibrate_chunks, accelerator=driver.accelerator,
                     step_hook=step_hook, seed=seed, decode=False, mask_full=mask_full)
        calibration, calibration_s = scope.calibration, time.perf_counter() - start
        driver.accelerator.reset()  # the timed run starts with an empty cache, as the uncalibrated one
    compiled_before, tuned_before = _compiles(), launched_shapes()
    gen = generate(setup.world, trajectory, driver.policy, chunks, accelerator=driver.accelerator,
                   step_hook=step_hook, seed=seed, progress=True, mask_full=mask_full)
    recompiles = _compiles() - compiled_before
    stats = [driver.chunk_stats(c, s) for c, s in enumerate(gen.selections)]
    return Run(gen, stats, recompiles, launched_shapes() - tuned_before, warmup_s, calibration, calibration_s,
               warmup_kernel_s)


def _compiles() -> int:
    """Compilations so far in this process: Dynamo frames, regions compiled (``li_compile.regions``) and
    symbolic graphs specialized to a shape (``li_compile.specialize``)."""
    return counters["frames"]["ok"] + counters[REGION_COUNTER]["compiled"] + counters[SPECIALIZE_COUNTER]["compiled"]


# --- report ------------------------------------------------------------------------------------


def chunk_rows(dense: Run, light: Run) -> list[dict[str, float]]:
    """One row per chunk: times, context decisions, cache hits, PSNR (of the chunk's pictures, and of
    its worst frame) and SSIM of light vs dense."""
    rows = []
    for c, (t_dense, t_light) in enumerate(zip(dense.generation.chunk_times, light.generation.chunk_times)):
        frames = dense.generation.chunk(c)
        a, b = dense.generation.frames[frames], light.generation.frames[frames]
        stats = {"memory_kept": 0, "memory_pruned": 0, "density": 1.0, "cache_hits": 0, "cache_near_hits": 0,
                 "context_rows_reused": 0, "row_blocks_calls": 0, "fallbacks": 0, **light.stats[c]}
        rows.append({
            "chunk": c, "dense_ms": 1000 * t_dense, "light_ms": 1000 * t_light,
            "window": len(light.generation.selections[c].recent), **stats,
            "psnr_db": psnr(a, b), "min_frame_psnr_db": min(psnr(x, y) for x, y in zip(a, b)), "ssim": ssim(a, b),
        })
    return rows


TABLE = (  # column title, row key, decimals (None: an integer)
    ("chunk", "chunk", None), ("dense ms", "dense_ms", 1), ("li ms", "light_ms", 1), ("window", "window", None),
    ("mem kept", "memory_kept", None), ("pruned", "memory_pruned", None), ("density", "density", 2),
    ("hits", "cache_hits", None), ("near hits", "cache_near_hits", None), ("PSNR dB", "psnr_db", 1),
    ("SSIM", "ssim", 3),
)


def format_table(rows: list[dict[str, float]]) -> str:
    """The per-chunk table as text, one line per chunk."""
    def cell(value: float, decimals: int | None, width: int) -> str:
        return f"{int(value):>{width}d}" if decimals is None else f"{float(value):>{width}.{decimals}f}"

    widths = [max(len(title), 7) for title, _, _ in TABLE]
    lines = ["  ".join(f"{title:>{w}}" for (title, _, _), w in zip(TABLE, widths))]
    for row in rows:
        lines.append("  ".join(cell(row[key], dec, w) for (_, key, dec), w in zip(TABLE, widths)))
    return "\n".join(lines)


def summarize(rows: list[dict[str, float]], dense: Run, light: Run, truth: torch.Tensor | None = None) -> dict[str, Any]:
    """The summary (the JSON keys of issue 7): speedup, recompiles, cache hits, pruning, density, fidelity, times;
    with ground-truth frames ``truth`` also ``truth_scores``."""
    time_dense, time_light = sum(dense.generation.chunk_times), sum(light.generation.chunk_times)
    scores = truth_scores(dense.generation, light.generation, truth) if truth is not None else {}
    return {
        "speedup": time_dense / time_light,
        "recompiles_after_warmup": light.recompiles,
        "kernel_autotunes_after_warmup": light.kernel_autotunes,
        "cache_hits": int(sum(r["cache_hits"] for r in rows)),
        "cache_near_hits": int(sum(r["cache_near_hits"] for r in rows)),
        "context_rows_reused": int(sum(r["context_rows_reused"] for r in rows)),
        "context_rows_off": sorted({r["context_rows_off"] for r in rows
                                    if r.get("context_rows_off") and r["context_rows_off"] != PROBED}),
        "row_blocks_calls": int(sum(r["row_blocks_calls"] for r in rows)),
        "row_blocks_off": sorted({r["row_blocks_off"] for r in rows if r.get("row_blocks_off")}),
        "memory_frames_pruned": int(sum(r["memory_pruned"] for r in rows)),
        "memory_frames_kept": int(sum(r["memory_kept"] for r in rows)),
        "attention_fallbacks": int(sum(r["fallbacks"] for r in rows)),
        "attention_density_mean": sum(r["density"] for r in rows) / len(rows),
        "psnr_db_vs_dense": sum(r["psnr_db"] for r in rows) / len(rows),
        "min_psnr_db": min(r["psnr_db"] for r in rows),
        "min_frame_psnr_db": min(r["min_frame_psnr_db"] for r in rows),
        "ssim_vs_dense": sum(r["ssim"] for r in rows) / len(rows),
        "time_dense_s": time_dense,
        "time_li_s": time_light,
        "dense_recompiles_after_warmup": dense.recompiles,
        "chunks": len(rows),
        **scores,
    }


def truth_scores(dense: Generation, light: Generation, truth: torch.Tensor) -> dict[str, float]:
    """PSNR (mean of per-frame dB) and SSIM against ground truth ``(T, 3, H, W)`` of the dense run,
    the light_interaction run and "repeat the last given frame", over the generated frames (chunk 0
    is given)."""
    given = dense.chunk(0).stop
    frames = slice(given, len(dense.frames))
    target = truth[frames]
    repeat = repeat_last(truth, given, frames.stop)
    return {
        "psnr_db_dense_vs_truth": frame_psnr(dense.frames[frames], target),
        "psnr_db_li_vs_truth": frame_psnr(light.frames[frames], target),
        "psnr_db_repeat_last_vs_truth": frame_psnr(repeat, target),
        "ssim_dense_vs_truth": ssim(dense.frames[frames], target),
        "ssim_li_vs_truth": ssim(light.frames[frames], target),
    }


def format_sites(report: li_compile.Report) -> str:
    """One line: how many attention sites the backend rewrote and skipped, with the skip reasons."""
    sites = [s for s in report.sites if s.kind == "attention"]
    rewritten = sum(s.status == "rewritten" for s in sites)
    reasons = sorted({s.reason.split(" (")[0] for s in sites if s.status == "skipped"})
    skipped = f", skipped {len(sites) - rewritten} ({'; '.join(reasons)})" if len(sites) > rewritten else ""
    return f"light_interaction rewrote {rewritten} of {len(sites)} attention sites of the denoiser{skipped}"


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    return "\n".join([
        f"speedup {s['speedup']:.2f}x  (dense {s['time_dense_s']:.2f} s, light_interaction {s['time_li_s']:.2f} s, "
        f"{s['chunks']} chunks)",
        f"memory frames kept {s['memory_frames_kept']}, pruned {s['memory_frames_pruned']}; "
        f"attention density {s['attention_density_mean']:.2f}; denoise-cache hits {s['cache_hits']}"
        + (f"; attention calls reusing context rows {s['context_rows_reused']}" if s.get("context_rows_reused") else "")
        + (f"; block calls on the chunk's rows alone {s['row_blocks_calls']}" if s.get("row_blocks_calls") else ""),
        *([f"context rows not reused: {'; '.join(s['context_rows_off'])}"] if s.get("context_rows_off") else []),
        *([f"blocks not run on the chunk's rows alone: {'; '.join(s['row_blocks_off'])}"]
          if s.get("row_blocks_off") else []),
        f"vs dense: PSNR {s['psnr_db_vs_dense']:.1f} dB (worst chunk {s['min_psnr_db']:.1f}, worst frame "
        f"{s['min_frame_psnr_db']:.1f}), SSIM {s['ssim_vs_dense']:.3f}",
        f"recompilations after warm-up: {s['recompiles_after_warmup']} (dense: {s['dense_recompiles_after_warmup']})",
        *([f"vs ground truth: PSNR dense {s['psnr_db_dense_vs_truth']:.2f} dB, light_interaction "
           f"{s['psnr_db_li_vs_truth']:.2f} dB, repeat-last {s['psnr_db_repeat_last_vs_truth']:.2f} dB; "
           f"SSIM dense {s['ssim_dense_vs_truth']:.3f}, light_interaction {s['ssim_li_vs_truth']:.3f}"]
          if "psnr_db_dense_vs_truth" in s else []),
    ])


# --- pictures ------------------------------------------------------------------------------------


def plot_timeline(rows: list[dict[str, float]], trajectory: trajectories.Trajectory, chunk_frames: int, path: Path) -> None:
    """Per-chunk time (dense vs light_interaction), decisions (memory kept/pruned, cache hits, PSNR)
    and the trajectory seen from above, coloured by chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = [r["chunk"] for r in rows]
    fig, (ax_time, ax_ctx, ax_path) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_time.plot(chunks, [r["dense_ms"] for r in rows], "o-", label="dense (Inductor)")
    ax_time.plot(chunks, [r["light_ms"] for r in rows], "s-", label="light_interaction")
    ax_time.set(xlabel="chunk", ylabel="ms per chunk", title="time per chunk")
    ax_time.legend()
    kept = [r["memory_kept"] for r in rows]
    ax_ctx.bar(chunks, kept, label="memory kept")
    ax_ctx.bar(chunks, [r["memory_pruned"] for r in rows], bottom=kept, label="memory pruned")
    ax_ctx.plot(chunks, [r["cache_hits"] for r in rows], "k^", label="cache hits")
    ax_psnr = ax_ctx.twinx()
    ax_psnr.plot(chunks, [r["psnr_db"] for r in rows], "r.-", label="PSNR vs dense")
    ax_psnr.set_ylabel("PSNR dB", color="r")
    ax_ctx.set(xlabel="chunk", ylabel="frames / hits", title="decisions per chunk")
    ax_ctx.legend(loc="upper left", fontsize=8)
    centers = trajectory.poses[: len(rows) * chunk_frames, :3, 3]
    colour = torch.arange(len(centers)) // chunk_frames
    points = ax_path.scatter(centers[:, 0], centers[:, 2], c=colour, cmap="viridis", s=14)
    ax_path.set(xlabel="x", ylabel="z", title=f"trajectory {trajectory.name!r} (top view)")
    ax_path.set_aspect("equal", adjustable="datalim")
    fig.colorbar(points, ax=ax_path, label="chunk")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_frames(dense: Generation, light: Generation, path: Path, shown: int = 6) -> None:
    """The last frame of ``shown`` chunks spread over the run: dense, light_interaction, |difference| x 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = len(dense.chunk_times)
    picks = sorted({round(i * (chunks - 1) / max(1, shown - 1)) for i in range(min(shown, chunks))})
    fig, axes = plt.subplots(3, len(picks), figsize=(2.2 * len(picks), 6.6), squeeze=False)
    for col, c in enumerate(picks):
        frame = dense.chunk(c).stop - 1
        a, b = dense.frames[frame], light.frames[frame]
        for row, (img, title) in enumerate(((a, "dense"), (b, "light_interaction"), (((a - b).abs() * 4).clamp(0, 1), "|diff| x4"))):
            axes[row, col].imshow(img.permute(1, 2, 0).numpy())
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
            axes[row, col].set_title(f"{title}\nchunk {c}" if row == 0 else title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_block_layout(layout: BlockLayout, title: str, path: Path) -> None:
    """The visited (query block, key block) pairs of a layout: full, partial (masked) and skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = layout.block_mask(full_only=True)[0, 0].float() if layout.full_kv_num_blocks is not None else 0
    picture = layout.block_mask()[0, 0].float() * 0.5 + full * 0.5
    fig, ax = plt.subplots(figsize=(6, 6 * picture.shape[0] / max(1, picture.shape[1]) + 1))
    ax.imshow(picture.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xlabel="key block", ylabel="query block", title=f"{title}\ndark: full, light: partial, white: skipped")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chunk_layout(world: World, selection: ContextSelection) -> BlockLayout:
    """The block layout a chunk's self-attention runs with ``selection`` (one block per frame):
    padding and dropped slots of the context are skipped, by ``li_compile.controller.attention_plan``."""
    capacity = selection.capacity or world.spec.context_frames
    sequence = world.layout(capacity)
    keep = padded_context_keep(len(selection.frames), capacity)
    tokens = world.spec.tokens_per_frame
    return frame_drop_layout(sequence, keep, tokens, tokens)


# --- the example ----------------------------------------------------------------------------------


def run_example(world_module: ModuleType, default_trajectory: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the world of ``world_module`` (``hy_worldplay`` or ``matrix_game3``), run dense and
    light_interaction along a trajectory with revisits, print the table and summary, write plots
    and JSON as flagged. Returns the summary."""
    forms = getattr(world_module, "FORMS", ())
    args = parse_args(world_module.__doc__.splitlines()[0], default_trajectory, argv, world_module.PRESET_NAMES, forms)
    start = time.perf_counter()
    form = getattr(args, "form", None)
    world = world_module.build(args.preset, device=args.device, seed=args.seed, **({} if form is None else {"form": form}))
    spec = world.spec
    trajectory = trajectories.make(args.trajectory, args.chunks * spec.chunk_frames, seed=args.seed,
                                   chunk_frames=spec.chunk_frames)
    print(f"{spec.name} on {args.device}: {args.chunks} chunks x {spec.chunk_frames} latent frames, "
          f"{spec.tokens_per_frame} tokens per frame, context {spec.context_frames} frames, {spec.steps} steps, "
          f"trajectory '{args.trajectory}'")
    truth, prefix = ground_truth(args.preset, world, trajectory, args.seed)
    setups = {"dense": dense_setup(world, blocks=args.blocks),
              "light_interaction": light_interaction_setup(world, args.options, blocks=args.blocks)}
    calibrate = {"dense": None, "light_interaction": args.calibrate}
    runs = {label: timed_run(setup, trajectory, args.chunks, args.seed, prefix, calibrate=calibrate[label])
            for label, setup in progress_bar(setups.items(), "runs")}
    dense, light = runs["dense"], runs["light_interaction"]
    print(format_sites(li_compile.report(setups["light_interaction"].world.model)))
    if light.calibration is not None:
        print(f"calibrated in {light.calibration_s:.1f} s on {CALIBRATION_CHUNKS} chunks:\n{light.calibration.table()}")
    rows = chunk_rows(dense, light)
    summary = summarize(rows, dense, light, truth)
    print(format_table(rows))
    print(format_summary(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_timeline(rows, trajectory, spec.chunk_frames, args.out / "timeline.png")
        save_frames(dense.generation, light.generation, args.out / "frames.png")
        pick = max(range(len(rows)), key=lambda c: (rows[c]["memory_pruned"], c))
        plot_block_layout(chunk_layout(world, light.generation.selections[pick]),
                          f"{spec.name}: self-attention blocks of chunk {pick}", args.out / "block_layout.png")
        print(f"pictures in {args.out}/: timeline.png, frames.png, block_layout.png")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {**summary, "world": spec.name, "tokens_per_frame": spec.tokens_per_frame,
                  "trajectory": args.trajectory, "device": args.device, "options": args.options, "per_chunk": rows}
        args.json.write_text(json.dumps(record, indent=2))
        print(f"summary written to {args.json}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return summary
