"""Building blocks shared by the reference DiTs: patches, timestep and camera embeddings, camera
rays, 3D RoPE, camera-relative attention (PRoPE), per-frame modulation, cross-attention and the MLP.

Token order everywhere: frame-major, each frame's tokens in raster order (``grid_h`` rows of
``grid_w``), i.e. hidden states ``(B, frames * tokens_per_frame, D)`` that view as
``(B, frames, tokens_per_frame, D)``; this is the order ``li_compile.sequence.SequenceLayout`` describes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from li_compile.controller.poses import bounds_from_fov, invert_poses, make_poses, relative_pose

TIMESTEP_SCALE = 1000.0  # sigma in [0, 1] -> the timestep the sinusoidal embedding sees
FREQ_DIM = 256  # width of the sinusoidal timestep features
ROPE_THETA = 10000.0
CAMERA_DIM = 12  # a relative pose's 3x4 block, flattened
PLUCKER_DIM = 6  # a camera ray in Plücker coordinates: direction, then origin x direction


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Latent frames to patch tokens: ``(B, T, C, h, w)`` -> ``(B, T * (h/p) * (w/p), C * p * p)``."""
    b, t, c, h, w = x.shape
    x = x.reshape(b, t, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, t * (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, frames: int, channels: int, h: int, w: int, patch: int) -> torch.Tensor:
    """Inverse of ``patchify``: ``(B, T * (h/p) * (w/p), C * p * p)`` -> ``(B, T, C, h, w)``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, frames, h // patch, w // patch, channels, patch, patch)
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, frames, channels, h, w)


def timestep_features(sigma: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """Sinusoidal features of noise levels: ``(...)`` -> ``(..., dim)`` float32 (timestep = 1000 sigma)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    angles = sigma.float()[..., None] * TIMESTEP_SCALE * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


def camera_features(reference: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """Camera conditioning: ``poses (..., 4, 4)`` seen from the ``reference (4, 4)`` camera, their
    3x4 block flattened: ``(..., 12)``. Relative, so the world frame does not matter."""
    return relative_pose(reference, poses)[..., :3, :4].flatten(-2)


def frame_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` (an int for square frames, or ``(height, width)``) as ``(height, width)``."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s >= 1 for s in hw):
        raise ValueError(f"size must be an int >= 1 or (height, width), got {size!r}")
    return hw


def camera_rays(poses: torch.Tensor, fov_y_deg: float, size: int | Sequence[int],
                supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions for every subpixel of every camera.

    ``poses: (..., 4, 4)`` -> ``(..., R, 3)`` each with ``R = H * W * supersample ** 2`` for
    ``size = (H, W)`` (aspect ``W / H``), in row-major subpixel order (rows down: camera +y).
    """
    height, width = frame_size(size)
    n_y, n_x = height * supersample, width * supersample
    x_min, x_max, y_min, y_max = bounds_from_fov(fov_y_deg, width / height).tolist()
    step_x, step_y = (x_max - x_min) / n_x, (y_max - y_min) / n_y
    xs = x_min + step_x * (torch.arange(n_x, device=poses.device, dtype=torch.float32) + 0.5)
    ys = y_min + step_y * (torch.arange(n_y, device=poses.device, dtype=torch.float32) + 0.5)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    local = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)  # (R, 3) camera coordinates
    dirs = local @ poses[..., :3, :3].transpose(-1, -2)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = poses[..., None, :3, 3].expand_as(dirs)
    return origins, dirs


class RayEmbedder(nn.Module):
    """Every token's camera rays, embedded: ``camera (B, T, 12)`` relative poses (``camera_features``)
    -> ``(B, T * tokens_per_frame, dim)``.

    One ray per latent pixel, through its centre, for a lens of vertical field of view ``fov_y_deg``
    on the ``latent_h x latent_w`` grid (``camera_rays``, as the renderer casts them), in Plücker coordinates
    (unit direction, origin x direction: the same line gives the same six numbers wherever along it
    the camera stands), stacked per ``patch x patch`` token as ``patchify`` stacks latents, then a
    linear layer. Two frames whose cameras saw a point along the same ray get the same features
    there, so attention can find in the context what a chunk frame sees (CameraCtrl-style camera
    conditioning).
    """

    def __init__(self, fov_y_deg: float, latent_h: int, latent_w: int, patch: int, dim: int) -> None:
        super().__init__()
        _, local = camera_rays(torch.eye(4), fov_y_deg, (latent_h, latent_w), 1)
        self.register_buffer("local_dirs", local, persistent=False)  # (h * w, 3), camera coordinates
        self.grid, self.patch = (latent_h, latent_w), patch
        self.proj = nn.Linear(PLUCKER_DIM * patch * patch, dim)

    def plucker(self, camera: torch.Tensor) -> torch.Tensor:
        """The rays of every latent pixel: ``camera (B, T, 12)`` -> ``(B, T, h * w, 6)`` float32,
        raster order, unit direction then moment."""
        pose = camera.float().unflatten(-1, (3, 4))
        # rotate by a sum of products, not a matmul, so autocast leaves the rays in float32
        dirs = (pose[..., None, :, :3] * self.local_dirs[:, None, :]).sum(-1)  # unit length still
        moments = torch.linalg.cross(pose[..., None, :, 3].expand_as(dirs), dirs, dim=-1)
        return torch.cat([dirs, moments], -1)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        b, t = camera.shape[:2]
        rays = self.plucker(camera).reshape(b, t, *self.grid, PLUCKER_DIM).permute(0, 1, 4, 2, 3)
        return self.proj(patchify(rays, self.patch).to(self.proj.weight.dtype))


class CameraRope(nn.Module):
    """Camera-relative attention (PRoPE, "Cameras as Relative Positional Encoding"): the
    per-frame matrices that make attention between two frames depend on their relative pose only.

    ``forward(camera (B, T, 12))`` (``camera_features``: camera-to-reference poses ``C``) returns
    ``(to_query, to_key, to_out)``, each ``(B, T, 4, 4)`` float32: ``C^-T``, ``C`` and ``C^-1``,
    translations measured in ``unit`` scene lengths. With queries multiplied by ``C_i^-T``, keys and
    values by ``C_j`` and the output by ``C_i^-1`` (``apply_camera_rope`` on the camera part of the
    head dim), a score is ``q_i . (C_i^-1 C_j) k_j`` and a value arrives as ``C_i^-1 C_j v_j``: the
    pose of frame ``j`` seen from frame ``i``, whatever the world frame. Two frames at the same
    camera meet through the identity, so a remembered view lines up with the chunk token for token.
    ``unit`` is a persistent buffer: weights record that they were trained with it.
    """

    def __init__(self, unit: float) -> None:
        super().__init__()
        self.register_buffer("unit", torch.tensor(float(unit)))

    def forward(self, camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pose = camera.float().unflatten(-1, (3, 4))
        to_reference = make_poses(pose[..., :3], pose[..., 3] / self.unit.float())
        to_camera = invert_poses(to_reference)  # float32 under autocast too
        return to_camera.transpose(-1, -2), to_reference, to_camera


def apply_camera_rope(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Multiply every 4-vector of ``x: (B, H, T * N, D)`` (``D % 4 == 0``, ``T`` frames of ``N``
    tokens) by its frame's matrix of ``matrices: (B, T, 4, 4)`` (``CameraRope``), in float32."""
    b, h, length, d = x.shape
    frames = matrices.shape[1]
    blocks = x.float().reshape(b, h, frames, length // frames, d // 4, 4)
    m = matrices.float()[:, None, :, None, None]  # (B, 1, T, 1, 1, 4, 4)
    out = sum(m[..., :, j] * blocks[..., j:j + 1] for j in range(4))
    return out.reshape(b, h, length, d).to(x.dtype)


class Embedder(nn.Module):
    """MLP from input features to the model width: ``(..., in_dim)`` -> ``(..., dim)``."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class Rope3D(nn.Module):
    """Rotary position embedding over (t, h, w) with ``split = (dt, dh, dw)`` of the head dim.

    Spatial angles are fixed by the grid (buffers); temporal positions come per frame as a tensor,
    so a world can place frames where it likes (HY-WorldPlay reframes memory next to the chunk).
    """

    def __init__(self, split: tuple[int, int, int], grid: tuple[int, int]) -> None:
        super().__init__()
        if any(d % 2 for d in split):
            raise ValueError(f"RoPE split {split} must be even numbers")
        self.split = split
        dt, dh, dw = split
        self.register_buffer("inv_t", _inv_freq(dt), persistent=False)
        rows = torch.arange(grid[0], dtype=torch.float32)[:, None].expand(grid).reshape(-1)
        cols = torch.arange(grid[1], dtype=torch.float32)[None, :].expand(grid).reshape(-1)
        hw = torch.cat([rows[:, None] * _inv_freq(dh), cols[:, None] * _inv_freq(dw)], -1)  # (T, (dh + dw) / 2)
        self.register_buffer("hw_angles", hw, persistent=False)

    def forward(self, frame_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``(B, 1, frames * T, head_dim / 2)`` for temporal positions
        ``frame_t: (B, frames)`` (float)."""
        b, frames = frame_t.shape
        tokens = self.hw_angles.shape[0]
        t = (frame_t.float()[..., None] * self.inv_t)[:, :, None, :].expand(b, frames, tokens, -1)
        hw = self.hw_angles.expand(b, frames, tokens, -1)
        angles = torch.cat([t, hw], -1).reshape(b, 1, frames * tokens, -1)
        return angles.cos(), angles.sin()


def _inv_freq(d: int) -> torch.Tensor:
    return 1.0 / ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: (B, H, L, D)`` by angles ``cos, sin: (B, 1, L, D/2)`` (half-split pairs), in float32."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-frame adaLN modulation: ``x (B, frames * T, D)``, ``shift, scale (B, frames, D)``."""
    b, length, d = x.shape
    x = x.reshape(b, frames, length // frames, d)
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(b, length, d)


def gate(x: torch.Tensor, g: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-frame gate: ``x (B, frames * T, D) * g (B, frames, D)``."""
    b, length, d = x.shape
    return (x.reshape(b, frames, length // frames, d) * g[:, :, None]).reshape(b, length, d)


def heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``(B, L, H * D)`` -> ``(B, H, L, D)``."""
    b, length, _ = x.shape
    return x.reshape(b, length, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B, L, H * D)``."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def key_padding_mask(valid: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Bool SDPA mask ``(B, 1, 1, frames * T)`` keeping the tokens of valid frames ``(B, frames)``."""
    b, frames = valid.shape
    return valid[:, :, None].expand(b, frames, tokens_per_frame).reshape(b, 1, 1, frames * tokens_per_frame)


def context_and_chunk_mask(context_valid: torch.Tensor | None, chunk: int, tokens_per_frame: int) -> torch.Tensor | None:
    """``key_padding_mask`` of keys that are the context's slots (``context_valid (B, K)``) then
    ``chunk`` chunk frames, always valid; None without ``context_valid`` (every key valid, no mask)."""
    if context_valid is None:
        return None
    b = context_valid.shape[0]
    return key_padding_mask(torch.cat([context_valid, context_valid.new_ones(b, chunk)], 1), tokens_per_frame)


class CrossAttention(nn.Module):
    """Video tokens attend to prompt tokens (kept small; the attention pass leaves it dense)."""

    def __init__(self, dim: int, n_heads: int, text_dim: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(text).chunk(2, -1)
        out = F.scaled_dot_product_attention(heads(self.q(x), self.n_heads), heads(k, self.n_heads), heads(v, self.n_heads))
        return self.out(merge_heads(out))


class FeedForward(nn.Module):
    """The transformer MLP: ``Linear -> GELU(tanh) -> Linear``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
