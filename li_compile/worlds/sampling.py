"""Few-step flow-matching samplers of the reference worlds: the sigma schedule and one update each.

Flow matching (rectified flow) as both upstream families use it: a latent at noise level ``sigma``
is ``x_sigma = (1 - sigma) x0 + sigma * noise``, and the model predicts the velocity
``v = noise - x0``. A chunk is denoised from ``sigma = 1`` (pure noise) to ``sigma = 0`` over a
short decreasing schedule; each step calls the model once and applies one of:

- ``euler_step``: the ODE step of a flow-matching scheduler, ``x + (sigma_next - sigma) v``
  (HY-WorldPlay's FlowMatchDiscreteScheduler with solver "euler").
- ``renoise_step``: the update of distilled few-step samplers (DMD / Self-Forcing style, as in
  Matrix-Game's distilled models): predict the clean latent ``x0 = x - sigma v``, then noise it
  afresh to the next level, ``(1 - sigma_next) x0 + sigma_next * noise``.

The schedule is a tensor so that the model receives ``sigma`` as a tensor value (no recompiles).
"""

from __future__ import annotations

import torch

SAMPLERS = ("euler", "renoise")


def sigma_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Decreasing noise levels ``(steps + 1,)`` float32 from 1 to 0 with the usual timestep shift:
    ``sigma = shift t / (1 + (shift - 1) t)`` for ``t`` evenly spaced in [1, 0]. A shift above 1
    spends more of the few steps at high noise, as video models at high resolution do."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow-matching ODE: ``x + (sigma_next - sigma) * v``; any shape."""
    return x + (sigma_next - sigma) * v


def renoise_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """One step of a distilled few-step sampler: ``x0 = x - sigma v``, returned re-noised to
    ``sigma_next`` with fresh ``noise`` (same shape as ``x``); at ``sigma_next = 0`` it is ``x0``."""
    x0 = x - sigma * v
    return (1 - sigma_next) * x0 + sigma_next * noise


def sampler_update(
    name: str, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Apply the update of the sampler called ``name`` (one of ``SAMPLERS``); ``noise`` is used by
    ``renoise`` only."""
    if name == "euler":
        return euler_step(x, v, sigma, sigma_next)
    if name == "renoise":
        return renoise_step(x, v, sigma, sigma_next, noise)
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")
