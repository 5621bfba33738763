"""HY-WorldPlay-style reference world (HY-World 1.5 on HunyuanVideo 1.5): a full-sequence video DiT
with reconstituted context memory. Random weights; the structure is what matters here.

What it mirrors (upstream: Tencent-Hunyuan/HY-WorldPlay, ``hyvideo/pipelines/worldplay_video_pipeline.py``,
``worldplay_1_5_transformer.py``, ``trainer/dataset/ar_camera_hunyuan_w_mem_dataset.py``):

- Chunk-autoregressive generation: each interaction step denoises a chunk of **4 latent frames**
  (``pred_latent_size = 4``; 16 video frames through the 4x temporal VAE).
- Reconstituted context memory: the chunk sees past latent frames as **clean context**
  (timestep 0) concatenated before it in the **same token sequence**: the recent
  **12** frames (``temporal_context_size``) plus frames retrieved by field-of-view overlap of
  their cameras with the chunk's (``select_aligned_memory_frames``, ``memory_frames = 20`` in all,
  so 8 retrieved). Context tokens pass every layer: full self-attention over
  ``[memory + recent + chunk]`` tokens (``SequenceLayout(queries="all")``).
- Temporal reframing: the context frames' temporal RoPE positions are re-assigned right before the
  chunk (slot ``i`` of ``C`` context slots gets ``i - C``, the chunk ``0 .. F-1``), so retrieved
  frames from long ago look recent to the model.
- HunyuanVideo-1.5 blocks: adaLN modulation from timestep + camera (+ action) per frame, QK
  RMSNorm, 3D RoPE over (t, h, w) with the head dim split ``16/56/56`` of 128, GELU(tanh) MLP of
  ratio 4; full preset **54 blocks, width 2048, 16 heads x 128**, latent **32 channels**, VAE
  compression **4x16x16**, **patch 1**: at 480p (480x832) **30x52 = 1560 tokens per frame**.
- Sampler: distilled few-step flow matching, **Euler** updates (FlowMatchDiscreteScheduler,
  ``solver="euler"``) with flow shift 7.

Assumed (not confirmed from upstream code in the time available): 4 sampler steps for the
distilled model; the camera enters as a flattened relative 3x4 pose through an MLP (upstream:
camera/action embeddings; PRoPE-style camera-relative attention is an option,
``WorldSpec.prope_unit``, off in the random-weight presets); the prompt enters through a small
cross-attention (upstream joins text tokens in the attention, MMDiT-style; here
the self-attention sequence holds video tokens only); discrete actions per chunk frame through an
MLP, zero for context frames.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from li_compile.sequence import SequenceLayout
from li_compile.worlds.base import (
    X0_MIN_SIGMA, Context, World, WorldSpec, init_model, prompt_embedding, resolve_spec,
)
from li_compile.worlds.layers import (
    CAMERA_DIM, FREQ_DIM, CameraRope, CrossAttention, Embedder, FeedForward, RayEmbedder, Rope3D, apply_camera_rope,
    apply_rope, camera_features, gate, heads, key_padding_mask, merge_heads, modulate, patchify, timestep_features,
    unpatchify,
)
from li_compile.worlds.trajectories import ACTION_DIM

PRESETS: dict[str, WorldSpec] = {
    "tiny": WorldSpec(
        name="hy_worldplay/tiny", latent_channels=4, latent_h=8, latent_w=8, patch=2, chunk_frames=2,
        window=2, memory=4, steps=4, shift=7.0, sampler="euler", depth=2, heads=2, head_dim=32,
        mlp_ratio=4.0, text_tokens=4, text_dim=32,
    ),
    "small": WorldSpec(
        name="hy_worldplay/small", latent_channels=16, latent_h=16, latent_w=24, patch=1, chunk_frames=4,
        window=8, memory=8, steps=4, shift=7.0, sampler="euler", depth=8, heads=8, head_dim=64,
        mlp_ratio=4.0, text_tokens=32, text_dim=512, dtype=torch.bfloat16,
    ),
    "full": WorldSpec(
        name="hy_worldplay/full", latent_channels=32, latent_h=30, latent_w=52, patch=1, chunk_frames=4,
        window=12, memory=8, steps=4, shift=7.0, sampler="euler", depth=54, heads=16, head_dim=128,
        mlp_ratio=4.0, text_tokens=256, text_dim=3584, dtype=torch.bfloat16,
    ),
}
TRAINED = "trained"  # the preset with trained weights (li_compile.worlds.training)
PRESET_NAMES = (*PRESETS, TRAINED)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """HunyuanVideo's (t, h, w) split of the head dim: 16/56/56 of 128, scaled and kept even."""
    t = max(2, head_dim // 8 // 2 * 2)
    hw = (head_dim - t) // 2 // 2 * 2
    return t, hw, head_dim - t - hw


class HYBlock(nn.Module):
    """Self-attention over the whole sequence (QK RMSNorm, 3D RoPE, key padding; with
    ``spec.prope_unit`` PRoPE on the heads' first ``camera_rope_dims``), prompt cross-attention,
    MLP; adaLN shift/scale/gate per frame."""

    def __init__(self, spec: WorldSpec) -> None:
        super().__init__()
        dim = spec.dim
        self.n_heads = spec.heads
        self.camera_dims = spec.camera_rope_dims
        self.mod = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(spec.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(spec.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, spec.heads, spec.text_dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * spec.mlp_ratio))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, text: torch.Tensor,
                camera_rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        frames = cond.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(cond)).chunk(6, -1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1, frames)).chunk(3, -1)
        q, k, v = self.q_norm(heads(q, self.n_heads)), self.k_norm(heads(k, self.n_heads)), heads(v, self.n_heads)
        if camera_rope is None:
            attn = F.scaled_dot_product_attention(apply_rope(q, *rope), apply_rope(k, *rope), v, attn_mask=mask)
        else:
            to_query, to_key, to_out = camera_rope
            c = self.camera_dims
            q = torch.cat([apply_camera_rope(q[..., :c], to_query), apply_rope(q[..., c:], *rope)], -1)
            k = torch.cat([apply_camera_rope(k[..., :c], to_key), apply_rope(k[..., c:], *rope)], -1)
            v = torch.cat([apply_camera_rope(v[..., :c], to_key), v[..., c:]], -1)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            attn = torch.cat([apply_camera_rope(attn[..., :c], to_out), attn[..., c:]], -1)
        x = x + gate(self.proj(merge_heads(attn)), gate1, frames)
        x = x + self.cross(self.norm2(x), text)
        return x + gate(self.mlp(modulate(self.norm3(x), shift2, scale2, frames)), gate2, frames)


class HYWorldPlayDiT(nn.Module):
    """The denoiser: ``forward(x, sigma, context, context_valid, camera, actions, text) -> velocity``.

    ``x: (B, F, C, h, w)`` the noisy chunk at noise level ``sigma`` (0-d tensor);
    ``context: (B, K, C, h, w)`` clean context frames in ``K`` slots, ``context_valid: (B, K)`` bool
    (``None``: every slot valid, no mask); ``camera: (B, K + F, 12)`` relative poses,
    ``actions: (B, K + F, 6)``, ``text: (B, N, text_dim)``.
    Returns the velocity ``(B, F, C, h, w)`` (with ``spec.output == "x0"`` the network predicts the
    clean chunk and returns its velocity; with ``spec.ray_fov_deg`` every token also gets its camera
    rays, ``RayEmbedder``; with ``spec.prope_unit`` self-attention is camera-relative, ``CameraRope``).
    Tokens: context frames then chunk frames.
    """

    def __init__(self, spec: WorldSpec) -> None:
        super().__init__()
        self.spec = spec
        dim, p, c = spec.dim, spec.patch, spec.latent_channels
        self.patch_in = nn.Linear(c * p * p, dim)
        self.time = Embedder(FREQ_DIM, dim)
        self.camera = Embedder(CAMERA_DIM, dim)
        self.rays = None if spec.ray_fov_deg is None else RayEmbedder(
            spec.ray_fov_deg, spec.latent_h, spec.latent_w, p, dim)
        self.action = Embedder(ACTION_DIM, dim)
        self.prope = None if spec.prope_unit is None else CameraRope(spec.prope_unit)
        self.rope = Rope3D(rope_split(spec.head_dim - spec.camera_rope_dims), spec.grid)
        self.blocks = nn.ModuleList(HYBlock(spec) for _ in range(spec.depth))
        self.final_mod = nn.Linear(dim, 2 * dim)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.patch_out = nn.Linear(dim, c * p * p)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None,
                camera: torch.Tensor, actions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        b, chunk, slots = x.shape[0], x.shape[1], context.shape[1]
        frames = slots + chunk
        h = self.patch_in(patchify(torch.cat([context, x], 1), spec.patch))
        if self.rays is not None:
            h = h + self.rays(camera)
        noise_level = torch.cat([sigma.new_zeros(b, slots), sigma.reshape(1, 1).expand(b, chunk)], 1)
        cond = self.time(timestep_features(noise_level).to(h.dtype)) + self.camera(camera) + self.action(actions)
        reframed = (torch.arange(frames, device=x.device) - slots).float().expand(b, frames)
        rope = self.rope(reframed)
        mask = None if context_valid is None else key_padding_mask(
            torch.cat([context_valid, context_valid.new_ones(b, chunk)], 1), spec.tokens_per_frame)
        camera_rope = None if self.prope is None else self.prope(camera)
        for block in self.blocks:
            h = block(h, cond, rope, mask, text, camera_rope)
        shift, scale = self.final_mod(F.silu(cond)).chunk(2, -1)
        out = self.patch_out(modulate(self.final_norm(h), shift, scale, frames))
        out = out[:, slots * spec.tokens_per_frame:]
        out = unpatchify(out, chunk, spec.latent_channels, spec.latent_h, spec.latent_w, spec.patch)
        if spec.output == "x0":
            return (x - out) / sigma.clamp_min(X0_MIN_SIGMA)
        return out


class HYWorldPlay(World):
    """The HY-WorldPlay-style world: ``model`` (``HYWorldPlayDiT``) plus its per-chunk inputs."""

    revisit_inputs = ("context", "context_valid", "camera", "actions")

    def __init__(self, spec: WorldSpec, model: HYWorldPlayDiT, text: torch.Tensor) -> None:
        self.spec, self.model, self.text = spec, model, text

    def layout(self, capacity: int | None = None) -> SequenceLayout:
        """Context slots then chunk frames; every token is a query (full-sequence memory)."""
        slots = self.spec.context_frames if capacity is None else capacity
        grid_h, grid_w = self.spec.grid
        return SequenceLayout(slots, self.spec.chunk_frames, grid_h, grid_w, queries="all")

    def inputs(self, context: Context, chunk_poses: torch.Tensor, chunk_actions: torch.Tensor,
               first_frame: int) -> dict[str, torch.Tensor]:
        """Cameras relative to the chunk's first camera; actions for chunk frames only."""
        dtype = self.spec.dtype
        poses = torch.cat([context.poses[0], chunk_poses])
        camera = camera_features(chunk_poses[0], poses)[None]
        actions = torch.cat([torch.zeros(context.capacity, ACTION_DIM), chunk_actions])[None]
        return {
            "context": context.latents,
            "context_valid": context.valid,
            "camera": camera.to(self.device, dtype),
            "actions": actions.to(self.device, dtype),
            "text": self.text,
        }


def build(preset: str | WorldSpec = "tiny", device: Any = None, dtype: torch.dtype | None = None,
          seed: int = 0) -> HYWorldPlay:
    """The world of ``preset`` (a name in ``PRESETS`` or a ``WorldSpec``) with seeded random weights,
    on ``device`` (default CPU) in ``dtype`` (default: the preset's; ``full`` is bf16); ``"trained"``:
    the world trained on rendered rooms, with the shipped weights (fp32; ``seed`` and ``dtype`` unused)."""
    if preset == TRAINED:
        from li_compile.worlds.training import load_trained  # training builds on this module

        return load_trained(device)
    spec = resolve_spec(preset, PRESETS, dtype)
    model = init_model(HYWorldPlayDiT, spec, device, seed)
    return HYWorldPlay(spec, model, prompt_embedding(spec, seed, model.patch_in.weight.device))
