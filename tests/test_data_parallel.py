"""Data-parallel training (torch's DDP in ``training.recipe.train``, helpers in ``training.data_parallel``):
two CPU processes over gloo.

Each test spawns two processes that run one task and save what they end with; the test compares
those results with each other and with a single-process run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import data_parallel
from li_compile.worlds.trained import TRAINED_SPEC
from training.recipe import TrainConfig, train
from training.data import make_pool

SPEC = replace(TRAINED_SPEC, name="trained/dp-test", latent_h=4, latent_w=4, depth=1, heads=2, head_dim=16)
IMAGE = 16
CONFIG = TrainConfig(steps=4, batch=4, sigma_groups=2, warmup=1, final_lr_fraction=1.0, clips=2, clip_frames=12,
                     checkpoint_every=2)


def _pool():
    return make_pool(2, 12, SPEC, seed=0, device="cpu", image_size=IMAGE)


def _collectives_task(rank: int, out: Path) -> dict:
    """The schedule's length and the recorded loss agree across the processes."""
    return {"min": data_parallel.agree_min(10 + rank, torch.device("cpu")),
            "mean": data_parallel.mean_across(float(rank), torch.device("cpu"))}


def _same_data_task(rank: int, out: Path) -> dict:
    """Both processes draw process 0's data (stride 0), so the mean gradient is each one's own."""
    with mock.patch.object(data_parallel, "RANK_SEED_STRIDE", 0):
        state = train(CONFIG, "cpu", pool=_pool(), spec=SPEC)
    return {"ema": state.ema, "losses": state.losses}


def _resume_task(rank: int, out: Path) -> dict:
    """An uninterrupted two-process run, and one stopped at step 2 and resumed from its checkpoint."""
    pool = _pool()
    whole = train(CONFIG, "cpu", pool=pool, spec=SPEC)
    train(replace(CONFIG, steps=2), "cpu", out / "ckpt.pt", pool=pool, spec=SPEC)
    resumed = train(CONFIG, "cpu", out / "ckpt.pt", pool=pool, spec=SPEC)
    return {"whole": whole.ema, "whole_losses": whole.losses, "resumed": resumed.ema,
            "resumed_losses": resumed.losses}


TASKS = {"collectives": _collectives_task, "same_data": _same_data_task, "resume": _resume_task}


def _process(rank: int, task: str, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    try:
        torch.save(TASKS[task](rank, out), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two(task: str, out: Path) -> list[dict]:
    mp.spawn(_process, args=(task, out), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_the_processes_agree_on_the_schedule_and_the_loss(tmp_path):
    for result in _run_two("collectives", tmp_path):
        assert result["min"] == 10
        assert result["mean"] == pytest.approx(0.5)


def test_two_processes_on_the_same_data_train_as_one(tmp_path):
    """The machinery around the averaging (DDP's gradient all-reduce, the recorded loss's mean, the
    agreed schedule, the gathered checkpoint states) leaves a run unchanged: two processes drawing
    the same batches end with the weights and losses of the single-process run. (That different
    data meets in one set of weights is the next test's.)"""
    torch.set_num_threads(1)
    single = train(CONFIG, "cpu", pool=_pool(), spec=SPEC)
    results = _run_two("same_data", tmp_path)
    for result in results:
        assert result["losses"] == pytest.approx(single.losses, rel=1e-5)
        for k, v in single.ema.items():
            torch.testing.assert_close(result["ema"][k], v, rtol=1e-5, atol=1e-6)


def test_a_two_process_run_resumes_as_if_uninterrupted_and_only_with_two(tmp_path):
    results = _run_two("resume", tmp_path)
    for result in results:
        assert result["resumed_losses"] == pytest.approx(result["whole_losses"], rel=1e-5)
        for k, v in result["whole"].items():
            torch.testing.assert_close(result["resumed"][k], v)
    # the processes drew different data, so their losses differ from a single process's; the weights
    # they share are identical
    for k, v in results[0]["whole"].items():
        torch.testing.assert_close(results[1]["whole"][k], v, rtol=0, atol=0)
    single = train(replace(CONFIG, steps=2), "cpu", pool=_pool(), spec=SPEC)
    assert single.losses != pytest.approx(results[0]["whole_losses"][:2], rel=1e-3)
    with pytest.raises(ValueError, match="written by 2 training processes; resume it with as many, not 1"):
        train(CONFIG, "cpu", tmp_path / "ckpt.pt", pool=_pool(), spec=SPEC)
