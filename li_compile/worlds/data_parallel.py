"""Data-parallel training over several processes (``torchrun``), with no model wrapper.

Every process holds the whole model (the same initial weights: ``MODEL_SEED`` fixes them), draws
its own batches (``rank_seed``), and after each backward pass the gradients are averaged across
the processes (``average_gradients``). Every process then takes the same optimiser step, so the
weights stay identical without ever being sent. ``TrainConfig.batch`` is per process: the global
batch is ``batch * world_size()``. With one process (no process group) every function here is the
identity and training is exactly the single-device run.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

RANK_SEED_STRIDE = 7919  # process r > 0 draws data from seed + r * this (process 0: the seed itself)


def world_size() -> int:
    """Processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_seed(seed: int, process: int) -> int:
    """The data seed of process ``process``: ``seed`` for process 0, so one process draws what a
    single-device run draws; distinct seeds for the others."""
    return seed + RANK_SEED_STRIDE * process


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over the processes, in one all-reduce. A
    process without a gradient for a parameter counts as zero; a parameter no process has a
    gradient for keeps none, so the optimiser skips it as it would in a single process."""
    params = list(params)
    if world_size() == 1:
        return
    device = params[0].device
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device) for p in params]
    flat = torch.cat([*grads, has_grad])
    dist.all_reduce(flat)
    flat /= world_size()
    present = flat[-len(params):].cpu().tolist()  # one device sync, not one per parameter
    offset = 0
    for p, has in zip(params, present):
        count = p.numel()
        p.grad = flat[offset:offset + count].view_as(p).clone() if has > 0 else None
        offset += count


def mean_across(value: float, device: torch.device) -> float:
    """``value`` averaged over the processes (e.g. a step's loss, for the record)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / world_size()


def agree_min(value: int, device: torch.device) -> int:
    """The smallest of the processes' ``value``: one schedule length they all keep."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every process gets here (e.g. until the lead has written a checkpoint)."""
    if world_size() > 1:
        dist.barrier()


def gather(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order (``[obj]`` for one process)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
