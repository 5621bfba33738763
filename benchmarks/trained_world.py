"""Fidelity of the trained HY-WorldPlay-style world against rendered ground truth (issue 8).

    python -m benchmarks.trained_world                       # shipped weights, CPU, a few minutes
    python -m benchmarks.trained_world --device cuda --weights runs/trained/hy_trained.pt --json fid.json

On held-out rooms and trajectories (every name of ``li_compile.worlds.trajectories``), starting from
the true first chunk: PSNR/SSIM of dense generation and of "repeat the last given frame" against
ground truth, and on revisit frames PSNR with memory against memory removed. Prints a table,
writes ``--json`` and, with ``--out``, a picture of truth / dense / no memory per case.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.fidelity import add_case_arguments, evaluate, rollout, trained_world_and_cases
from li_compile.worlds.pipeline import DensePolicy

COLUMNS = ("psnr_dense", "psnr_repeat_last", "psnr_video_dense", "psnr_video_repeat_last", "ssim_dense",
           "ssim_repeat_last", "psnr_revisit_memory", "psnr_revisit_no_memory", "psnr_video_revisit_memory",
           "psnr_video_revisit_no_memory")


def print_table(result: dict) -> None:
    """One row per case and the mean; '-' where a case has no revisit frames."""
    header = f"{'trajectory':26s}" + "".join(f"{c.replace('psnr_', '').replace('_', ' '):>19s}" for c in COLUMNS)
    print(header)
    for row in result["cases"] + [dict(result["mean"], trajectory="mean")]:
        cells = "".join(f"{row[c]:19.3f}" if c in row else f"{'-':>19s}" for c in COLUMNS)
        print(f"{row['trajectory']:26s}{cells}")


def save_strips(world, codec, cases, path: Path) -> None:
    """Truth, dense and no-memory frames of every case, every 4th frame, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = world.spec
    rows = []
    for case in cases:
        dense = rollout(world, codec, case, DensePolicy(spec.window, spec.memory))
        blind = rollout(world, codec, case, DensePolicy(spec.window, 0))
        for frames in (case.frames[:len(dense)], dense, blind):
            rows.append(torch.cat(list(frames[::4]), -1))
    grid = torch.cat(rows, -2).permute(1, 2, 0).clamp(0, 1)
    fig = plt.figure(figsize=(grid.shape[1] / 64, grid.shape[0] / 64), dpi=64)
    fig.figimage(grid.numpy())
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, per_trajectory=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for the picture of the rollouts")
    args = parser.parse_args()
    world, codec, cases = trained_world_and_cases(args)
    result = evaluate(world, codec, cases)
    mean = result["mean"]
    result["dense_gain_over_repeat_last_db"] = mean["psnr_dense"] - mean["psnr_repeat_last"]
    result["dense_gain_over_repeat_last_video_db"] = mean["psnr_video_dense"] - mean["psnr_video_repeat_last"]
    result["repeat_last_exact_frames"] = sum(case["repeat_last_exact_frames"] for case in result["cases"])
    if "psnr_revisit_memory" in mean:
        result["memory_gain_on_revisits_db"] = mean["psnr_revisit_memory"] - mean["psnr_revisit_no_memory"]
        result["memory_gain_on_revisits_video_db"] = (mean["psnr_video_revisit_memory"]
                                                       - mean["psnr_video_revisit_no_memory"])
    print_table(result)
    print({k: round(v, 3) for k, v in result.items() if k.endswith("_db")},
          f"repeat-last is exact on {result['repeat_last_exact_frames']} frames")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        save_strips(world, codec, cases[::args.per_trajectory], args.out / "rollouts.png")


if __name__ == "__main__":
    main()
