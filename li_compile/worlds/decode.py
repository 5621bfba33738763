"""A fixed random stand-in for the VAE decoder: latents -> RGB pictures.

The reference worlds have random weights and no VAE; to look at what they generate and to score
an approximation on images (PSNR/SSIM against the dense run, as one would on decoded video), the
latents go through a seeded linear map to 3 channels (a 1x1 convolution), a sigmoid and a bilinear
upsampling. Deterministic per seed and channel count, so two runs decode alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPSAMPLE = 8  # pixels per latent in the pictures (the real VAEs use 16; 8 keeps pictures small)


class LatentDecoder:
    """Seeded linear decoder: ``(N, C, h, w)`` latents -> ``(N, 3, h * upsample, w * upsample)`` in [0, 1]."""

    def __init__(self, channels: int, upsample: int = UPSAMPLE, seed: int = 0) -> None:
        if channels < 1 or upsample < 1:
            raise ValueError(f"LatentDecoder needs channels >= 1 and upsample >= 1, got {channels}, {upsample}")
        gen = torch.Generator().manual_seed(seed + 104729)
        self.weight = torch.randn(3, channels, 1, 1, generator=gen) / channels**0.5
        self.upsample = upsample

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode on the CPU in float32 (pictures are for people and metrics, not for speed)."""
        if latents.ndim != 4 or latents.shape[1] != self.weight.shape[1]:
            raise ValueError(f"latents must be (N, {self.weight.shape[1]}, h, w), got {tuple(latents.shape)}")
        rgb = torch.sigmoid(F.conv2d(latents.detach().float().cpu(), self.weight))
        if self.upsample == 1:
            return rgb
        return F.interpolate(rgb, scale_factor=self.upsample, mode="bilinear", align_corners=False).clamp(0, 1)
