"""The end-to-end table (markdown) from ``benchmarks/results/e2e_summary.json``, the rows that
``benchmarks/end_to_end.py`` writes: the README's and ``benchmarks/results/end_to_end.md``'s tables.

    python benchmarks/e2e_table.py [--summary benchmarks/results/e2e_summary.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

COLUMNS = (  # title, row key, format
    ("world", "world", "{}"), ("depth", "depth", "{}"), ("trajectory", "trajectory", "{}"), ("run", "run", "{}"),
    ("chunks", "chunks", "{}"), ("speedup", "speedup", "{:.2f}x"), ("dense s", "time_dense_s", "{:.2f}"),
    ("li s", "time_li_s", "{:.2f}"), ("PSNR vs dense (mean / worst chunk / worst frame)", None, None),
    ("cache hits", "cache_hits", "{}"),
    ("frames pruned", "memory_frames_pruned", "{}"), ("density", "attention_density_mean", "{:.2f}"),
    ("peak GB (li / dense)", None, None), ("warm-up s (li / dense)", None, None),
    ("recompiles", "recompiles_after_warmup", "{}"), ("commit", "commit", "{}"),
)


TRUTH_COLUMNS = (  # rows of the trained worlds, scored against the renderer's ground truth (dB)
    ("dense vs truth", "psnr_db_dense_vs_truth", "{:.2f}"), ("li vs truth", "psnr_db_li_vs_truth", "{:.2f}"),
    ("li - dense", None, None), ("repeat-last vs truth", "psnr_db_repeat_last_vs_truth", "{:.2f}"),
)


def cell(row: dict, title: str, key: str | None, fmt: str | None) -> str:
    if title.startswith("PSNR"):
        frame = f"{row['min_frame_psnr_db']:.1f}" if "min_frame_psnr_db" in row else "-"  # rows before the field
        return f"{row['psnr_db_vs_dense']:.1f} / {row['min_psnr_db']:.1f} / {frame} dB"
    if title.startswith("peak"):
        return "-" if row["peak_gb"] is None else f"{row['peak_gb']:.2f} / {row['peak_gb_dense']:.2f}"
    if title in (t for t, _, _ in TRUTH_COLUMNS) and "psnr_db_dense_vs_truth" not in row:
        return "-"  # a row written before end_to_end.py kept the truth scores
    if title == "li - dense":
        return f"{row['psnr_db_li_vs_truth'] - row['psnr_db_dense_vs_truth']:+.2f}"
    if title == "device":
        return short_device(row["device"])
    if title == "cache hits" and row.get("cache_near_hits"):  # newer rows: near revisits, partly served
        return f"{row['cache_hits']} + {row['cache_near_hits']} near"
    if title.startswith("warm-up"):
        kernel = f" ({row['warmup_kernel_s_li']:.0f} kernel)" if "warmup_kernel_s_li" in row else ""  # newer rows
        return f"{row['warmup_s_li']:.0f}{kernel} / {row['warmup_s_dense']:.0f}"
    return fmt.format(row[key])


def short_device(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``; other names as they are."""
    match = re.search(r"\b[A-Z]\d{2,3}\b", name)
    return match.group(0) if match else name


def table(rows: list[dict]) -> str:
    """One markdown line per summary row: by world, the deepest runs first, then trajectory and run;
    with the ground-truth columns when a row has them (trained worlds), and a device column when the
    rows ran on more than one kind of device (timings compare only within one row)."""
    rows = sorted(rows, key=lambda r: (r["world"], -int(r["depth"]), r["trajectory"], r["run"]))
    columns = COLUMNS + (TRUTH_COLUMNS if any("psnr_db_dense_vs_truth" in r for r in rows) else ())
    if len({short_device(r["device"]) for r in rows}) > 1:
        columns += (("device", None, None),)
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row, *column) for column in columns) + " |" for row in rows]
    devices = sorted({f"{r['device']}, torch {r['torch']}" for r in rows})
    return "\n".join(lines) + f"\n\nMeasured on: {'; '.join(devices)}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=Path("benchmarks/results/e2e_summary.json"))
    print(table(json.loads(parser.parse_args().summary.read_text())))


if __name__ == "__main__":
    main()
