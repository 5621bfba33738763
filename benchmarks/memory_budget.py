"""How much of a world's peak memory its context K/V could ever give back.

Peak memory in the KV-cache form is the weights, the context's keys and values for every layer, and
the activations of one step. Compact context memory can only shrink the second term, so its share of
the dense run's measured peak bounds what any KV scheme (dropped frames, dropped tiles, fewer bytes
per value) can save. For each world's ``full`` preset this prints its weights (counted on the meta
device, nothing allocated), its context K/V at full capacity, the dense peak measured by
``benchmarks/end_to_end.py`` at that depth (rows of ``benchmarks/results/e2e_summary.json``) and the
share of it the context K/V is; and the share of the K/V a plan would have to drop for the peak to fall
by ``--target`` (0.25: issue 23's target).

    PYTHONPATH=. python benchmarks/memory_budget.py [--target 0.25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.end_to_end import world_label
from li_compile.worlds import hy_worldplay, matrix_game3

SUMMARY = Path(__file__).parent / "results" / "e2e_summary.json"
# world module -> whether its full preset has rows measured in the KV-cache form (``end_to_end.py --form
# cached``: Matrix-Game). HY full's rows re-process the context with the chunk at every step, HY's
# bidirectional mode: their peak holds no K/V cache, and its KV-cache form, HY-WorldPlay's AR inference,
# is counted as weights + K/V
WORLDS = {hy_worldplay: False, matrix_game3: True}


def budget(module, kv_cache_form: bool, target: float, rows: list[dict]) -> dict:
    """Weights, context K/V and measured dense peak (GB) of ``module``'s full preset; the K/V share of
    the peak and the share of the K/V that must go for the peak to fall by ``target``."""
    spec = module.PRESETS["full"]
    world = module.build("full", device="meta")
    itemsize = spec.dtype.itemsize
    weights = sum(p.numel() for p in world.model.parameters()) * itemsize / 1e9
    context_tokens = spec.context_frames * spec.tokens_per_frame
    kv = spec.depth * 2 * context_tokens * spec.heads * spec.head_dim * itemsize / 1e9
    peaks = [r["peak_gb_dense"] for r in rows if kv_cache_form and r["world"] == world_label(spec.name, "cached")
             and r["depth"] == spec.depth and r.get("peak_gb_dense")]
    peak = max(peaks) if peaks else weights + kv  # not measured: weights and K/V alone (a lower bound)
    return {
        "world": spec.name, "depth": spec.depth, "context_tokens": context_tokens, "weights_gb": weights,
        "context_kv_gb": kv, "dense_peak_gb": peak, "measured": bool(peaks),
        "kv_share_of_peak": kv / peak, "kv_to_drop_for_target": target * peak / kv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.25, help="the peak-memory reduction asked for")
    args = parser.parse_args()
    rows = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else []
    print(f"| world | depth | context tokens | weights GB | context K/V GB | dense peak GB | K/V share of peak "
          f"| K/V to drop for -{args.target:.0%} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for module, kv_cache_form in WORLDS.items():
        b = budget(module, kv_cache_form, args.target, rows)
        peak = f"{b['dense_peak_gb']:.2f}" + ("" if b["measured"] else " (weights + K/V)")
        drop = f"{b['kv_to_drop_for_target']:.0%}" + (" (impossible)" if b["kv_to_drop_for_target"] > 1 else "")
        print(f"| {b['world']} | {b['depth']} | {b['context_tokens']} | {b['weights_gb']:.2f} | {b['context_kv_gb']:.2f} "
              f"| {peak} | {b['kv_share_of_peak']:.0%} | {drop} |")


if __name__ == "__main__":
    main()
