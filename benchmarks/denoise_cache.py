"""Denoising cache on the reference worlds: model calls saved on revisits, and how close to dense.

For each world, trajectory with revisits and ``reuse_steps``: generate densely, then with the model
compiled by light_interaction (cache on, context controller off: the dense context), and compare the latents of every
chunk that hit the cache with the dense ones (PSNR). For scale, ``revisit_psnr`` compares the dense
revisit chunk with the dense chunk it revisits (same cameras, other noise and context): a cached
chunk much closer to dense than that has lost little. Prints a table and writes a JSON (and a plot
if matplotlib is installed). ``hy_trained`` (``--worlds hy_trained``) needs the trained weights
(``li_compile.worlds.trained.WEIGHTS_PATH``): on a model that predicts velocity well, x0 reuse is
expected to beat raw reuse, unlike on the random-weight tiny worlds.

    python benchmarks/denoise_cache.py --out denoise_cache.json [--device cuda] [--inner inductor]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import li_compile
from li_compile.worlds import hy_worldplay, matrix_game3, trained, trajectories
from li_compile.worlds.pipeline import generate
from li_compile.worlds.report_tools import configure_for

WORLDS = {  # name -> build(device): the random-weight tiny worlds, and the trained one (its weights shipped)
    "hy_worldplay": lambda device: hy_worldplay.build("tiny", device=device),
    "matrix_game3": lambda device: matrix_game3.build("tiny", device=device),
    "hy_trained": lambda device: trained.load_trained(device),
}
TRAJECTORIES = ("loop", "orbit", "random_walk_with_returns")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against reference ``b`` (peak: ``b``'s largest magnitude), in dB."""
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else float(10 * torch.log10(b.abs().max() ** 2 / mse))


def run(world_name: str, trajectory_name: str, frames: int, reuse_steps: int, stored: str, device: str,
        inner: str) -> dict:
    """One row: hits, model calls, PSNR of cached hit chunks against dense."""
    world = WORLDS[world_name](device)
    trajectory = trajectories.make(trajectory_name, frames)
    dense = generate(world, trajectory, decode=False)
    torch._dynamo.reset()
    options = {"inner": inner, "cache": {"reuse_steps": reuse_steps, "stored": stored},
               "context": {"enabled": False, "window_max": world.spec.window}}
    compiled = world.compile(lambda m: torch.compile(m, backend="light_interaction", options=options, dynamic=False))
    accelerator = li_compile.accelerator(compiled.model)
    configure_for(accelerator, world, trajectory)
    cached = generate(compiled, trajectory, accelerator=accelerator, decode=False)
    history = accelerator.denoise.history
    per_chunk, steps = world.spec.chunk_frames, world.spec.steps

    def frames_of(chunk: int) -> slice:
        return slice(chunk * per_chunk, (chunk + 1) * per_chunk)

    hits = [s for s in history if s.values["cache"] == "hit"]
    misses = [s for s in history if s.values["cache"] != "hit"]
    cached_psnr = [psnr(cached.latents[frames_of(s.chunk)], dense.latents[frames_of(s.chunk)]) for s in hits]
    revisit_psnr = [
        psnr(dense.latents[frames_of(s.chunk)], dense.latents[frames_of(s.values["reused_chunk"])]) for s in hits
    ]
    first_hit = min((s.chunk for s in hits), default=len(history))
    exact = all(
        torch.equal(cached.latents[frames_of(s.chunk)], dense.latents[frames_of(s.chunk)])
        for s in misses if s.chunk < first_hit  # later chunks see cached chunks as context
    )
    return {
        "world": world_name, "trajectory": trajectory_name, "frames": frames, "reuse_steps": reuse_steps,
        "stored": stored, "chunks": len(history), "hits": len(hits), "steps": steps,
        "model_calls": sum(s.values["steps_computed"] for s in history),
        "dense_model_calls": len(history) * steps,
        "misses_before_first_hit_exact": exact,
        "cached_psnr_mean": statistics.fmean(cached_psnr) if hits else None,
        "cached_psnr_min": min(cached_psnr) if hits else None,
        "revisit_psnr_mean": statistics.fmean(revisit_psnr) if hits else None,
        "cache_bytes": history[-1].values["cache_bytes"],
        # wall time of the hit chunks (selection, inputs, all steps), cached vs dense; the dense run is
        # eager, the cached one compiled by light_interaction with the chosen inner compiler
        "hit_chunk_ms": 1e3 * statistics.fmean(cached.chunk_times[s.chunk] for s in hits) if hits else None,
        "dense_chunk_ms": 1e3 * statistics.fmean(dense.chunk_times[s.chunk] for s in hits) if hits else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="denoise_cache.json")
    parser.add_argument("--worlds", nargs="+", default=["hy_worldplay", "matrix_game3"], choices=sorted(WORLDS))
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inner", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stored", nargs="+", default=["x0", "raw"], choices=["x0", "raw"])
    args = parser.parse_args()
    rows = [
        run(w, t, args.frames, k, stored, args.device, args.inner)
        for w in args.worlds for t in TRAJECTORIES for k in args.reuse for stored in args.stored
    ]
    header = ("world", "trajectory", "reuse_steps", "stored", "hits", "model_calls", "dense_model_calls",
              "misses_before_first_hit_exact", "cached_psnr_mean", "cached_psnr_min", "revisit_psnr_mean",
              "hit_chunk_ms", "dense_chunk_ms")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[h]:.1f}" if isinstance(row[h], float) else str(row[h]) for h in header))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    _plot(rows, args.out.rsplit(".", 1)[0] + ".png")


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shown = [r for r in rows if r["hits"]]
    labels = [f"{r['world'][:2]}/{r['trajectory'][:6]}/k={r['reuse_steps']}/{r['stored']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(6, len(shown)), 4))
    xs = range(len(shown))
    ax.bar([x - 0.2 for x in xs], [r["cached_psnr_mean"] for r in shown], 0.4, label="cached vs dense")
    ax.bar([x + 0.2 for x in xs], [r["revisit_psnr_mean"] for r in shown], 0.4, label="dense revisit vs first visit")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
