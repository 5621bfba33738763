"""How many recent frames to feed as temporal context, from how fast the latents change.

The change between consecutive latent frames is measured scale-free (``frame_changes``), averaged
over the recent frames (``latent_dynamics``), and mapped to a window length in
``[window_min, window_max]`` by a rule (``window_size``):

- ``"shrink_on_motion"``: the published method's rule. Large local dynamics -> a short window:
  when the view changes fast, older frames say little about the next one.
- ``"grow_on_motion"``: the opposite bet: fast motion needs more context to stay consistent.
- ``"fixed"``: always ``window_max``.

Which rule keeps fidelity best is measured on the reference worlds; the rule stays an option
(``options.context.window_rule``). All functions are pure and vectorised.
"""

from __future__ import annotations

import torch

from li_compile.options import WINDOW_RULES

DYNAMICS_LOW = 0.05  # change at or below which the latents count as static (rule -> one end of the range)
DYNAMICS_HIGH = 0.5  # change at or above which they count as fully in motion (-> the other end)
_TINY = 1e-12  # keeps all-zero frames from dividing by zero


def validate_latents(latents: torch.Tensor, name: str = "latents", first: int = 0) -> torch.Tensor:
    """Check recent latent frames ``(T, ...)`` (one per frame, any layout: ``(T, C, H, W)``,
    ``(T, H * W, C)``) with ``T >= 2``; return them as float32. ``first``: the index in ``name`` of
    ``latents[0]`` (the recent frames of a longer history).

    Raises ``ValueError`` for a non-tensor, no axis after the frames', fewer than two frames, a
    non-float dtype, or NaN / inf values (naming the first bad frame). Models that keep time in
    another axis (``(B, C, T, H, W)``) pass one sample with time first: ``x[b].transpose(0, 1)``.
    """
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(latents).__name__}")
    if latents.ndim < 2:
        raise ValueError(f"{name} must be (T, ...), one latent per frame, got shape {tuple(latents.shape)}")
    if latents.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 frames to measure change, got T={latents.shape[0]}")
    if not latents.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {latents.dtype}")
    latents = latents.float()
    bad = ~torch.isfinite(latents).flatten(1).all(1)
    if bad.any():
        raise ValueError(f"{name}[{first + torch.nonzero(bad)[0].item()}] contains NaN or inf")
    return latents


def frame_changes(latents: torch.Tensor) -> torch.Tensor:
    """Relative L1 change between consecutive frames: ``(T, ...)`` -> ``(T - 1,)`` in [0, 2].

    ``mean|x_t - x_{t-1}| / mean(|x_t| + |x_{t-1}|) * 2``: 0 for equal frames, 2 at most (the
    triangle inequality), unchanged when all latents are scaled by the same factor. Validates.
    """
    x = validate_latents(latents)
    diff = (x[1:] - x[:-1]).abs().flatten(1).mean(1)
    size = (x[1:].abs() + x[:-1].abs()).flatten(1).mean(1)
    return 2 * diff / size.clamp_min(_TINY)


def latent_dynamics(latents: torch.Tensor) -> torch.Tensor:
    """Local dynamics of the recent frames: the mean of ``frame_changes``, a 0-d tensor in [0, 2]."""
    return frame_changes(latents).mean()


def window_size(
    dynamics: torch.Tensor | float,
    rule: str,
    window_min: int,
    window_max: int,
    low: float = DYNAMICS_LOW,
    high: float = DYNAMICS_HIGH,
) -> torch.Tensor:
    """Temporal window length (number of recent frames) for each dynamics value: ``(...)`` -> ``(...)`` int64.

    The dynamics are placed on ``[low, high]`` as a motion fraction ``m`` in [0, 1] (clipped);
    ``"shrink_on_motion"`` gives ``window_max - m (window_max - window_min)``, ``"grow_on_motion"``
    gives ``window_min + m (window_max - window_min)``, ``"fixed"`` gives ``window_max``; rounded
    to the nearest int. Monotone in the dynamics and always within ``[window_min, window_max]``.
    """
    if rule not in WINDOW_RULES:
        raise ValueError(f"window rule must be one of {list(WINDOW_RULES)}, got {rule!r}")
    for key, value in (("window_min", window_min), ("window_max", window_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if window_min > window_max:
        raise ValueError(f"window_min ({window_min}) must not exceed window_max ({window_max})")
    if not 0 <= low < high < float("inf"):
        raise ValueError(f"need 0 <= low < high < inf for the dynamics range, got low={low}, high={high}")
    dynamics = torch.as_tensor(dynamics, dtype=torch.float32)
    if torch.isnan(dynamics).any():
        raise ValueError("dynamics contains NaN; expected values in [0, 2] from latent_dynamics")
    motion = ((dynamics - low) / (high - low)).clamp(0, 1)
    span = window_max - window_min
    if rule == "shrink_on_motion":
        size = window_max - motion * span
    elif rule == "grow_on_motion":
        size = window_min + motion * span
    else:
        size = torch.full_like(motion, window_max)
    return size.round().long()
