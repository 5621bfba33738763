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
    X0_MIN_SIGMA, Context, KVCacheWorld, MethodModule, World, WorldSpec, init_model, prompt_embedding, resolve_spec,
)
from li_compile.worlds.layers import (
    CAMERA_DIM, FREQ_DIM, CameraRope, CrossAttention, Embedder, FeedForward, RayEmbedder, Rope3D, apply_camera_rope,
    apply_rope, camera_features, context_and_chunk_mask, gate, heads, key_padding_mask, merge_heads, modulate, patchify,
    timestep_features, unpatchify,
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
TRAINED = "trained"  # the presets with trained weights (li_compile.worlds.trained)
TRAINED_AR = "trained_ar"
PRESET_NAMES = (*PRESETS, TRAINED, TRAINED_AR)
FORMS = ("full", "cached")  # the sequence forms of a block-causal world (build's ``form``)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """HunyuanVideo's (t, h, w) split of the head dim: 16/56/56 of 128, scaled and kept even."""
    t = max(2, head_dim // 8 // 2 * 2)
    hw = (head_dim - t) // 2 // 2 * 2
    return t, hw, head_dim - t - hw


class HYBlock(nn.Module):
    """Self-attention over the whole sequence (QK RMSNorm, 3D RoPE, key padding; with
    ``spec.prope_unit`` PRoPE on the heads' first ``camera_rope_dims``), prompt cross-attention,
    MLP; adaLN shift/scale/gate per frame. With a ``cache`` (the keys and values of earlier tokens,
    ``encode_context``) the keys and values are ``cat([cache, own])``: the KV-cache form."""

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
                mask: torch.Tensor | None, text: torch.Tensor,
                camera_rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: (B, frames * T, D)``, ``cond: (B, frames, D)``, ``cache: (2, B, H, Lc, hd)`` or None.
        Returns the new hidden states and this call's keys and values ``(B, H, frames * T, hd)``
        (RoPE and PRoPE applied: what a later call reads from its cache)."""
        frames = cond.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(cond)).chunk(6, -1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1, frames)).chunk(3, -1)
        q, k, v = self.q_norm(heads(q, self.n_heads)), self.k_norm(heads(k, self.n_heads)), heads(v, self.n_heads)
        if camera_rope is None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        else:
            to_query, to_key, _ = camera_rope
            c = self.camera_dims
            q = torch.cat([apply_camera_rope(q[..., :c], to_query), apply_rope(q[..., c:], *rope)], -1)
            k = torch.cat([apply_camera_rope(k[..., :c], to_key), apply_rope(k[..., c:], *rope)], -1)
            v = torch.cat([apply_camera_rope(v[..., :c], to_key), v[..., c:]], -1)
        keys, values = (k, v) if cache is None else (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2))
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        if camera_rope is not None:
            c = self.camera_dims
            attn = torch.cat([apply_camera_rope(attn[..., :c], camera_rope[2]), attn[..., c:]], -1)
        x = x + gate(self.proj(merge_heads(attn)), gate1, frames)
        x = x + self.cross(self.norm2(x), text)
        return x + gate(self.mlp(modulate(self.norm3(x), shift2, scale2, frames)), gate2, frames), k, v


class HYWorldPlayDiT(nn.Module):
    """The denoiser: ``forward(x, sigma, context, context_valid, camera, actions, text) -> velocity``.

    ``x: (B, F, C, h, w)`` the noisy chunk at noise level ``sigma`` (0-d tensor);
    ``context: (B, K, C, h, w)`` clean context frames in ``K`` slots, ``context_valid: (B, K)`` bool
    (``None``: every slot valid, no mask); ``camera: (B, K + F, 12)`` relative poses,
    ``actions: (B, K + F, 6)``, ``text: (B, N, text_dim)``.
    Returns the velocity ``(B, F, C, h, w)`` (with ``spec.output == "x0"`` the network predicts the
    clean chunk and returns its velocity; with ``spec.ray_fov_deg`` every token also gets its camera
    rays, ``RayEmbedder``; with ``spec.prope_unit`` self-attention is camera-relative, ``CameraRope``).
    Tokens: context frames then chunk frames; temporal RoPE positions ``-K .. -1`` for the context
    slots, ``0 .. F-1`` for the chunk.

    With ``spec.block_causal`` the context never attends to the chunk, and the same function has a
    KV-cache form: ``encode_context`` once per chunk, then ``forward_cached`` per denoising step
    (chunk queries over the cached context keys plus the chunk's own); ``forward_via_cache`` chains
    the two with ``forward``'s signature (training runs it: fewer FLOPs, no ``(L, L)`` mask).
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

    def _embed(self, latents: torch.Tensor, noise_level: torch.Tensor, camera: torch.Tensor, actions: torch.Tensor,
               positions: torch.Tensor):
        """Tokens ``(B, N * T, D)``, per-frame conditioning ``(B, N, D)``, RoPE and PRoPE matrices (or
        None) of ``N`` frames ``latents (B, N, C, h, w)`` at ``noise_level (B, N)``, temporal ``positions (B, N)``."""
        h = self.patch_in(patchify(latents, self.spec.patch))
        if self.rays is not None:
            h = h + self.rays(camera)
        cond = self.time(timestep_features(noise_level).to(h.dtype)) + self.camera(camera) + self.action(actions)
        camera_rope = None if self.prope is None else self.prope(camera)
        return h, cond, self.rope(positions), camera_rope

    def _head(self, h: torch.Tensor, cond: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The velocity ``(B, F, C, h, w)`` of the chunk ``x`` from its final hidden states ``h (B, F * T, D)``."""
        spec, chunk = self.spec, x.shape[1]
        shift, scale = self.final_mod(F.silu(cond)).chunk(2, -1)
        out = self.patch_out(modulate(self.final_norm(h), shift, scale, chunk))
        out = unpatchify(out, chunk, spec.latent_channels, spec.latent_h, spec.latent_w, spec.patch)
        if spec.output == "x0":
            return (x - out) / sigma.clamp_min(X0_MIN_SIGMA)
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor | None,
                camera: torch.Tensor, actions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        b, chunk, slots = x.shape[0], x.shape[1], context.shape[1]
        frames = slots + chunk
        noise_level = torch.cat([sigma.new_zeros(b, slots), sigma.reshape(1, 1).expand(b, chunk)], 1)
        reframed = (torch.arange(frames, device=x.device) - slots).float().expand(b, frames)
        h, cond, rope, camera_rope = self._embed(torch.cat([context, x], 1), noise_level, camera, actions, reframed)
        if spec.block_causal:
            mask = block_causal_mask(context_valid, b, slots, chunk, spec.tokens_per_frame, x.device)
        else:
            mask = context_and_chunk_mask(context_valid, chunk, spec.tokens_per_frame)
        for block in self.blocks:
            h, _, _ = block(h, cond, rope, mask, text, camera_rope)
        return self._head(h[:, slots * spec.tokens_per_frame:], cond[:, slots:], x, sigma)

    def encode_context(self, context: torch.Tensor, context_valid: torch.Tensor | None, camera: torch.Tensor,
                       actions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The KV cache of the clean context: ``(depth, 2, B, heads, K * T, head_dim)``.

        ``context: (B, K, C, h, w)`` at noise level 0, ``context_valid: (B, K)`` (``None``: all valid),
        ``camera: (B, K, 12)`` and ``actions: (B, K, 6)`` as ``forward`` takes them for the context.
        The context attends to itself only (``spec.block_causal``), as in ``forward``."""
        self._require_block_causal("encode_context")
        b, slots = context.shape[:2]
        positions = (torch.arange(slots, device=context.device) - slots).float().expand(b, slots)
        noise_level = torch.zeros(b, slots, device=context.device)
        h, cond, rope, camera_rope = self._embed(context, noise_level, camera, actions, positions)
        mask = None if context_valid is None else context_keys_mask(context_valid, self.spec.tokens_per_frame)
        cache = []
        for block in self.blocks:
            h, k, v = block(h, cond, rope, mask, text, camera_rope)
            cache.append(torch.stack([k, v]))
        return torch.stack(cache)

    def forward_cached(self, x: torch.Tensor, sigma: torch.Tensor, kv: torch.Tensor, context_valid: torch.Tensor | None,
                       camera: torch.Tensor, actions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``forward`` in the KV-cache form: ``kv`` from ``encode_context`` for ``K`` slots,
        ``camera: (B, F, 12)`` and ``actions: (B, F, 6)`` of the chunk frames only. Only the chunk's
        tokens are queries; their keys are ``cat([cached context, chunk])``. Returns the velocity."""
        self._require_block_causal("forward_cached")
        spec = self.spec
        b, chunk = x.shape[:2]
        positions = torch.arange(chunk, device=x.device).float().expand(b, chunk)
        h, cond, rope, camera_rope = self._embed(x, sigma.reshape(1, 1).expand(b, chunk), camera, actions, positions)
        mask = context_and_chunk_mask(context_valid, chunk, spec.tokens_per_frame)
        for block, cache in zip(self.blocks, kv.unbind(0)):
            h, _, _ = block(h, cond, rope, mask, text, camera_rope, cache)
        return self._head(h, cond, x, sigma)

    def forward_via_cache(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                          context_valid: torch.Tensor | None, camera: torch.Tensor, actions: torch.Tensor,
                          text: torch.Tensor) -> torch.Tensor:
        """``forward``'s inputs and result, computed as ``encode_context`` then ``forward_cached``."""
        slots = context.shape[1]
        kv = self.encode_context(context, context_valid, camera[:, :slots], actions[:, :slots], text)
        return self.forward_cached(x, sigma, kv, context_valid, camera[:, slots:], actions[:, slots:], text)

    def _require_block_causal(self, what: str) -> None:
        if not self.spec.block_causal:
            raise ValueError(f"{what} needs a block-causal world (WorldSpec.block_causal=True), got "
                             f"{self.spec.name!r} with block_causal=False: its context attends to the chunk")


def block_causal_mask(context_valid: torch.Tensor | None, batch: int, slots: int, chunk: int, tokens_per_frame: int,
                      device: torch.device) -> torch.Tensor:
    """Bool SDPA mask ``(B, 1, L, L)``, ``L = (slots + chunk) * tokens_per_frame``, of a block-causal
    sequence (context slots, then the chunk): chunk queries see the valid context and the chunk;
    context queries see the context only (``context_keys_mask``), never the chunk."""
    valid = torch.ones(batch, slots, dtype=torch.bool, device=device) if context_valid is None else context_valid
    context_rows = torch.cat([_context_keys(valid), valid.new_zeros(batch, chunk)], 1)  # (B, K + F)
    chunk_rows = torch.cat([valid, valid.new_ones(batch, chunk)], 1)
    frames = slots + chunk
    rows = torch.cat([context_rows[:, None].expand(batch, slots, frames), chunk_rows[:, None].expand(batch, chunk, frames)], 1)
    t = tokens_per_frame
    return rows[:, None, :, None, :, None].expand(batch, 1, frames, t, frames, t).reshape(batch, 1, frames * t, frames * t)


def context_keys_mask(context_valid: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Bool SDPA mask ``(B, 1, 1, K * T)`` of the context's self-attention: the valid slots, or every
    slot where none is valid (so nothing is NaN; the chunk masks those slots anyway)."""
    return key_padding_mask(_context_keys(context_valid), tokens_per_frame)


def _context_keys(valid: torch.Tensor) -> torch.Tensor:
    return valid | ~valid.any(-1, keepdim=True)


class HYWorldPlay(World):
    """The HY-WorldPlay-style world: ``model`` (``HYWorldPlayDiT``) plus its per-chunk inputs."""

    revisit_inputs = ("context", "context_valid", "camera", "actions")

    def __init__(self, spec: WorldSpec, model: HYWorldPlayDiT, text: torch.Tensor) -> None:
        self.spec, self.model, self.text = spec, model, text

    def layout(self, capacity: int | None = None) -> SequenceLayout:
        """Context slots then chunk frames; every token is a query (full-sequence memory)."""
        return self.context_layout(capacity, "all")

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


class HYWorldPlayCached(KVCacheWorld):
    """A block-causal HY-WorldPlay-style world in its deployment form (HY-WorldPlay's AR inference,
    ``cache_vision=True``): once per chunk ``encoder`` (``encode_context``) computes the context's
    keys and values; each denoising step runs ``model`` (``forward_cached``) on the chunk's tokens.
    Same weights and same outputs (up to rounding) as ``HYWorldPlay`` of the same DiT."""

    revisit_inputs = ("kv", "context_valid", "camera", "actions")

    def __init__(self, spec: WorldSpec, dit: HYWorldPlayDiT, text: torch.Tensor) -> None:
        if not spec.block_causal:
            raise ValueError(f"the KV-cache form needs WorldSpec.block_causal=True, got {spec.name!r}")
        self.spec, self.dit, self.text = spec, dit, text
        self.model = MethodModule(dit, "forward_cached")
        self.encoder = MethodModule(dit, "encode_context")

    def inputs(self, context: Context, chunk_poses: torch.Tensor, chunk_actions: torch.Tensor,
               first_frame: int) -> dict[str, torch.Tensor]:
        """Cameras relative to the chunk's first camera (as ``HYWorldPlay.inputs``); fills the KV cache."""
        dtype, device = self.spec.dtype, self.device
        reference = chunk_poses[0]
        context_camera = camera_features(reference, context.poses[0])[None].to(device, dtype)
        no_action = torch.zeros(1, context.capacity, ACTION_DIM, device=device, dtype=dtype)
        kv = self.encoder(context.latents, context.valid, context_camera, no_action, self.text)
        return {
            "kv": kv,
            "context_valid": context.valid,
            "camera": camera_features(reference, chunk_poses)[None].to(device, dtype),
            "actions": chunk_actions[None].to(device, dtype),
            "text": self.text,
        }


def build(preset: str | WorldSpec = "tiny", device: Any = None, dtype: torch.dtype | None = None,
          seed: int = 0, form: str | None = None) -> HYWorldPlay | HYWorldPlayCached:
    """The world of ``preset`` (a name in ``PRESETS`` or a ``WorldSpec``) with seeded random weights,
    on ``device`` (default CPU) in ``dtype`` (default: the preset's; ``full`` is bf16); ``"trained"``
    and ``"trained_ar"``: the worlds trained on rendered rooms, with their shipped weights (fp32;
    ``seed`` and ``dtype`` unused; ``li_compile.worlds.trained``).

    ``form``: ``"full"`` (``HYWorldPlay``: context and chunk in one sequence, every step) or
    ``"cached"`` (``HYWorldPlayCached``: the context's KV cache once per chunk; block-causal worlds
    only); ``None``: ``"cached"`` for block-causal worlds (their deployment form), else ``"full"``."""
    if preset in (TRAINED, TRAINED_AR):
        from li_compile.worlds.trained import load_trained, load_trained_ar  # trained builds on this module

        return load_trained(device) if preset == TRAINED else load_trained_ar(device, form=form)
    spec = resolve_spec(preset, PRESETS, dtype)
    model = init_model(HYWorldPlayDiT, spec, device, seed)
    return world_of(spec, model, prompt_embedding(spec, seed, model.patch_in.weight.device), form)


def world_of(spec: WorldSpec, model: HYWorldPlayDiT, text: torch.Tensor,
             form: str | None = None) -> HYWorldPlay | HYWorldPlayCached:
    """The world of ``model`` in ``form`` (see ``build``)."""
    form = form or ("cached" if spec.block_causal else "full")
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)} or None, got {form!r}")
    return (HYWorldPlayCached if form == "cached" else HYWorldPlay)(spec, model, text)
