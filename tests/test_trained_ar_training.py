"""The trained_ar training command and attention diagnostics, as tiny CPU smoke runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import attention_diagnostics
from li_compile.worlds.trained import sha256_of

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, **env) -> None:
    subprocess.run(["bash", "training/run_trained_ar.sh"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable, "SMOKE": "1", "OUT": str(out), **env})


def test_the_gpu_command_trains_checkpoints_and_records_the_hash_in_its_smoke_mode(tmp_path):
    _run(tmp_path)
    run = tmp_path / "trained_ar"
    summary = json.loads((run / "train.json").read_text())
    assert summary["preset"] == "trained_ar" and summary["steps"] == 2 and summary["spec"]["block_causal"] == "True"
    assert (tmp_path / "SHA256SUMS.line").read_text().split() == [sha256_of(run / "hy_trained_ar.pt"), "hy_trained_ar.pt"]
    weights = torch.load(run / "hy_trained_ar.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())
    _run(tmp_path / "stage2", RESUME=str(run / "hy_trained_ar.pt"))  # a second stage starts from the weights
    assert json.loads((tmp_path / "stage2" / "trained_ar" / "train.json").read_text())["config"]["init"] == str(
        run / "hy_trained_ar.pt")


def test_attention_shares_partition_the_mass_and_concentration_is_a_share(tmp_path):
    result = attention_diagnostics.main(["--smoke", "--out", str(tmp_path)])
    for row in result["per_layer"]:
        for own, recent, memory, visible, k90, k99 in zip(*(row[k] for k in ("own", "recent", "memory", "visible", "k90", "k99"))):
            assert abs(own + recent + memory - 1) < 1e-4
            assert 0 <= visible <= recent + memory + 1e-6 and 0 < k90 <= k99 <= 1
    assert (tmp_path / "attention_diagnostics.md").read_text().startswith("Command: `python -m benchmarks.attention_diagnostics")
