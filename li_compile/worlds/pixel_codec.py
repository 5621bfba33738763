"""Frames <-> latents by pixel patches: the (exactly invertible) "VAE" of the trained world.

The trained world has no learned autoencoder: a latent frame is its RGB frame cut into ``stride x
stride`` pixel patches stacked on the channel axis (``pixel_unshuffle``), normalised to roughly zero
mean and unit variance so that flow matching's unit-variance noise matches the data's scale.
A 64x64 frame with stride 4 is a ``(48, 16, 16)`` latent; decoding is the exact inverse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIXEL_MEAN = 0.5
PIXEL_STD = 0.25  # roughly the spread of rendered scene pixels; latents come out near unit variance


class PixelPatchCodec:
    """``encode: (..., 3, H, W)`` in [0, 1] -> ``(..., 3 * s * s, H / s, W / s)``; ``decode`` inverts it."""

    def __init__(self, stride: int = 4) -> None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.stride = stride

    @property
    def channels(self) -> int:
        return 3 * self.stride**2

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Pixel patches of ``frames (..., 3, H, W)`` (``H, W`` divisible by the stride), normalised."""
        if frames.ndim < 3 or frames.shape[-3] != 3 or frames.shape[-1] % self.stride or frames.shape[-2] % self.stride:
            raise ValueError(f"frames must be (..., 3, H, W) with H, W divisible by {self.stride}, got {tuple(frames.shape)}")
        lead = frames.shape[:-3]
        latents = F.pixel_unshuffle(frames.reshape(-1, *frames.shape[-3:]), self.stride)
        return ((latents - PIXEL_MEAN) / PIXEL_STD).reshape(*lead, *latents.shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames ``(..., 3, h * s, w * s)`` in [0, 1] from latents ``(..., 3 * s * s, h, w)`` (clamped)."""
        if latents.ndim < 3 or latents.shape[-3] != self.channels:
            raise ValueError(f"latents must be (..., {self.channels}, h, w), got {tuple(latents.shape)}")
        lead = latents.shape[:-3]
        frames = F.pixel_shuffle(latents.reshape(-1, *latents.shape[-3:]).float(), self.stride)
        return (frames * PIXEL_STD + PIXEL_MEAN).clamp(0, 1).reshape(*lead, *frames.shape[1:])
