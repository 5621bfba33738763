"""How well does the cheap pose proxy agree with the frustum-overlap reference? (CPU)

Draws seeded random pairs of cameras in several families (near, far, rotated in place, opposite,
orbiting a common point, moving along the view axis), scores each pair with ``frustum_overlap``
(the reference) and ``pose_proxy``, and reports per family and overall:

- Spearman rank correlation of the two scores (ties ranked by their average),
- mean |proxy - frustum|,
- agreement of the keep/drop decision at the keep threshold (a frame is kept when its score is
  >= threshold, with the same threshold for both measures): accuracy, and precision / recall of
  'keep' taking the reference's decision as the truth,
- a sweep of thresholds, and the time of one call with a bank of 256 cameras.

Prints a table and writes JSON::

    python benchmarks/similarity_agreement.py [--pairs 2000] [--out out/similarity_agreement.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from li_compile.controller.poses import look_at, make_poses, random_poses, rotation_about_axis
from li_compile.controller.similarity import DEFAULT_FAR, KEEP_THRESHOLD, frustum_overlap, pose_proxy

DECISION_KEYS = ("accuracy", "precision", "recall", "kept_reference")
SWEEP = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
TIMING_BANK = 256


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _unit(gen: torch.Generator, n: int) -> torch.Tensor:
    v = torch.randn(n, 3, generator=gen)
    return v / v.norm(dim=-1, keepdim=True)


def _turn(yaw_deg: torch.Tensor, pitch_deg: torch.Tensor, roll_deg: torch.Tensor) -> torch.Tensor:
    """Camera-frame rotations (yaw about y, pitch about x, roll about z), as a player turns: (n, 3, 3)."""
    axes = torch.eye(3)
    yaw = rotation_about_axis(axes[1].expand(len(yaw_deg), 3), torch.deg2rad(yaw_deg))
    pitch = rotation_about_axis(axes[0].expand(len(yaw_deg), 3), torch.deg2rad(pitch_deg))
    roll = rotation_about_axis(axes[2].expand(len(yaw_deg), 3), torch.deg2rad(roll_deg))
    return yaw @ pitch @ roll


def _relative(gen: torch.Generator, n: int, family: str) -> torch.Tensor:
    """Past cameras in the current camera's frame (the current camera is the identity): (n, 4, 4)."""
    u = lambda lo, hi: _uniform(gen, n, lo, hi)  # noqa: E731
    roll = u(-5, 5)
    if family == "near":  # small turn, short step
        rot, centre = _turn(u(-30, 30), u(-15, 15), roll), _unit(gen, n) * u(0, 0.3)[:, None] * DEFAULT_FAR
    elif family == "rotated":  # turning in place
        rot, centre = _turn(u(-180, 180), u(-45, 45), roll), _unit(gen, n) * 0.01 * DEFAULT_FAR
    elif family == "opposite":  # looking back
        rot, centre = _turn(u(160, 200), u(-20, 20), roll), _unit(gen, n) * u(0, 0.1)[:, None] * DEFAULT_FAR
    elif family == "axial":  # walking forward or backward, small turn
        centre = torch.zeros(n, 3)
        centre[:, 2] = u(-1, 1) * DEFAULT_FAR
        rot = _turn(u(-10, 10), u(-5, 5), roll)
    elif family == "far":  # anywhere else, looking anywhere
        rot = rotation_about_axis(_unit(gen, n), u(0, math.pi))
        centre = _unit(gen, n) * u(0.5, 3)[:, None] * DEFAULT_FAR
    elif family == "orbit":  # both cameras look at one point from different places on a circle
        radius, angle = u(0.1, 1) * DEFAULT_FAR, torch.deg2rad(u(-90, 90))
        target = torch.stack([torch.zeros(n), torch.zeros(n), radius], -1)
        eye = torch.stack([radius * torch.sin(angle), torch.zeros(n), radius * (1 - torch.cos(angle))], -1)
        return look_at(eye, target, up=(0.0, -1.0, 0.0))
    else:
        raise ValueError(f"unknown family {family!r}")
    return make_poses(rot, centre)


FAMILIES = ("near", "rotated", "opposite", "axial", "far", "orbit")


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    values, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    ranks = torch.empty_like(x)
    ranks[order] = ((ends - counts + ends - 1).double() / 2)[inverse].to(x.dtype)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman rank correlation with average ranks for ties (None when either input is constant)."""
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return None if denom == 0 else float((ra @ rb) / denom)


def decision_agreement(reference: torch.Tensor, proxy: torch.Tensor, threshold: float) -> dict:
    """Accuracy of the proxy's keep decision and its precision / recall of 'keep' against the reference."""
    truth, said = reference >= threshold, proxy >= threshold
    tp = (truth & said).sum().item()
    precision = tp / said.sum().item() if said.any() else None  # None: nothing kept, undefined
    recall = tp / truth.sum().item() if truth.any() else None
    return {
        "accuracy": (truth == said).float().mean().item(),
        "precision": precision,
        "recall": recall,
        "kept_reference": truth.float().mean().item(),
    }


def _row(name: str, ref: torch.Tensor, prox: torch.Tensor, threshold: float) -> dict:
    return {
        "family": name,
        "pairs": len(ref),
        "spearman": spearman(ref, prox),
        "mean_abs_diff": (ref - prox).abs().mean().item(),
        **decision_agreement(ref, prox, threshold),
    }


def _fmt(value: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def _time_call(fn, current: torch.Tensor, bank: torch.Tensor, repeats: int = 20) -> float:
    fn(current, bank)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(current, bank)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=KEEP_THRESHOLD)
    parser.add_argument("--out", type=Path, default=Path("out/similarity_agreement.json"))
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(args.seed)

    # Both measures are invariant to a rigid transform of the world (tested), so each family
    # scores one random current camera against past cameras placed relative to it.
    refs, proxies, rows = [], [], []
    for family in FAMILIES:
        current = random_poses(1, DEFAULT_FAR, gen)[0]
        bank = current @ _relative(gen, args.pairs, family)
        ref, prox = frustum_overlap(current, bank), pose_proxy(current, bank)
        refs.append(ref)
        proxies.append(prox)
        rows.append(_row(family, ref, prox, args.threshold))
    ref, prox = torch.cat(refs), torch.cat(proxies)
    rows.append(_row("all", ref, prox, args.threshold))
    sweep = [{"threshold": t, **decision_agreement(ref, prox, t)} for t in SWEEP]

    current, bank = torch.eye(4), random_poses(TIMING_BANK, DEFAULT_FAR, gen)
    timing_ms = {fn.__name__: _time_call(fn, current, bank) for fn in (frustum_overlap, pose_proxy)}

    decision_header = f"{'acc':>6} {'prec':>6} {'recall':>6} {'kept':>6}"
    print(f"proxy vs frustum overlap, keep threshold {args.threshold} (far = {DEFAULT_FAR})")
    print(f"{'family':<9} {'pairs':>6} {'spearman':>8} {'|diff|':>7} {decision_header}")
    for r in rows:
        decisions = " ".join(_fmt(r[k]) for k in DECISION_KEYS)
        print(f"{r['family']:<9} {r['pairs']:>6} {_fmt(r['spearman'], 8)} {_fmt(r['mean_abs_diff'], 7)} {decisions}")
    print(f"\nthreshold sweep (all pairs)\n{'thresh':>6} {decision_header}")
    for s in sweep:
        print(f"{s['threshold']:>6.2f} " + " ".join(_fmt(s[k]) for k in DECISION_KEYS))
    timings = ", ".join(f"{k} {v:.3f} ms" for k, v in timing_ms.items())
    print(f"\none call, bank of {TIMING_BANK} (CPU, {torch.get_num_threads()} threads): {timings}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"seed": args.seed, "far": DEFAULT_FAR, "threshold": args.threshold, "families": rows,
              "sweep": sweep, "timing_ms": timing_ms, "timing_bank": TIMING_BANK}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
