"""What data-parallel training (``torchrun``) needs around torch's ``DistributedDataParallel``.

Every process holds the whole model (the same initial weights: ``MODEL_SEED`` fixes them, and DDP
broadcasts process 0's), draws its own batches (``rank_seed``), and DDP averages the gradients
during the backward pass (``training.recipe.train``). Every process then takes the same optimiser
step, so the weights stay identical. These helpers agree on the rest: ranks, the recorded loss,
the schedule's length, the checkpoint's random states. ``TrainConfig.batch`` is per process: the global
batch is ``batch * world_size()``. With one process (no process group) every function here is the
identity and training is exactly the single-device run.
"""

from __future__ import annotations

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
