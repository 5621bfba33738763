"""Matrix-Game-3.0-style reference world: a Wan-family DiT whose chunk attends to clean context frames
(recent frames + retrieved memory), in upstream's one-sequence form or a KV-cache form, with
keyboard/mouse actions and camera conditioning, and a distilled few-step sampler. Random weights;
the structure is what matters here.

What it mirrors (upstream: SkyworkAI/Matrix-Game, ``Matrix-Game-3/pipeline/inference_pipeline.py``;
base model Wan2.2-TI2V-5B):

- Wan2.2-TI2V-5B sizes for the full preset: **30 blocks, width 3072, 24 heads x 128, FFN 14336**,
  latent **48 channels**, VAE stride **4x16x16**, patch **(1, 2, 2)**; at 704x1280 the latent is
  44x80, i.e. **22x40 = 880 tokens per frame**; text through cross-attention to T5 states
  (``text_len`` 512, width 4096); Wan blocks: adaLN from the timestep with a learned per-block
  ``modulation``, RMSNorm on q and k over the full width, 3D RoPE (t/h/w split
  ``d - 4(d//6)`` / ``2(d//6)`` / ``2(d//6)``), GELU(tanh) FFN; per-token timesteps (Wan2.2 TI2V), with
  clean context frames at timestep 0.
- Each iteration generates **40 video frames = 10 new latent frames**, conditioned on the
  **last 4 latent frames** of the previous iteration (re-injected clean, timestep 0) and
  **5 memory latent frames** retrieved by field-of-view overlap of their cameras
  (``select_memory_idx_fov``); memory and re-injected frames carry their true latent indices
  (``memory_latent_idx``), cameras as Plücker embeddings relative to a reference pose, keyboard
  (here 4 keys) and mouse (yaw/pitch) actions per frame, "no action" for memory frames.
- Distilled model (DMD, Self-Forcing-style multi-segment distillation): **3 sampler steps**, shift 5.

How attention is spelled here, in two forms of one DiT (``build``'s ``form``):

- ``"full"`` (the default), upstream's: at every denoising step the memory and re-injected frames (timestep 0)
  and the chunk's frames are one token sequence (``x_memory`` and the re-injected latents
  concatenated with the new ones in ``inference_pipeline.py``), every token a query
  (``forward_full``, ``SequenceLayout(queries="all")``): the context attends to the noisy chunk too.
- ``"cached"`` (the project's KV-cache case, ``SequenceLayout(queries="chunk")``): once
  per chunk ``encode_context`` runs the clean context frames through every block at timestep 0 and
  keeps each block's keys and values (``(depth, 2, B, heads, K * T, head_dim)``); every denoising
  step then runs only the chunk's tokens as queries against ``torch.cat([cached keys, chunk keys])``
  (``forward``), as Matrix-Game 2's Self-Forcing pipeline does: one context pass per chunk instead of
  the context in every step, and a context that never sees the chunk (other outputs than ``"full"``).

Assumed: the sampler is the x0-renoise update of distilled few-step samplers (upstream's inference
script runs the distilled model through a UniPC scheduler); the camera is a flattened relative 3x4
pose through an MLP (not per-pixel Plücker rays); actions enter through an MLP added to the
timestep embedding (not upstream's GameFactory-style action module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from li_compile.sequence import SequenceLayout
from li_compile.worlds.base import (
    Context, KVCacheWorld, MethodModule, World, WorldSpec, init_model, prompt_embedding, resolve_spec,
)
from li_compile.worlds.layers import (
    CAMERA_DIM, FREQ_DIM, CrossAttention, Embedder, FeedForward, Rope3D, apply_rope, camera_features,
    context_and_chunk_mask, gate, heads, key_padding_mask, merge_heads, modulate, patchify, timestep_features, unpatchify,
)
from li_compile.worlds.trajectories import ACTION_DIM

PRESETS: dict[str, WorldSpec] = {
    "tiny": WorldSpec(
        name="matrix_game3/tiny", latent_channels=4, latent_h=8, latent_w=8, patch=2, chunk_frames=2,
        window=2, memory=3, steps=3, shift=5.0, sampler="renoise", depth=2, heads=2, head_dim=32,
        mlp_ratio=14336 / 3072, text_tokens=4, text_dim=32,
    ),
    "small": WorldSpec(
        name="matrix_game3/small", latent_channels=16, latent_h=16, latent_w=32, patch=2, chunk_frames=5,
        window=4, memory=5, steps=3, shift=5.0, sampler="renoise", depth=8, heads=8, head_dim=64,
        mlp_ratio=14336 / 3072, text_tokens=32, text_dim=512, dtype=torch.bfloat16,
    ),
    "full": WorldSpec(
        name="matrix_game3/full", latent_channels=48, latent_h=44, latent_w=80, patch=2, chunk_frames=10,
        window=4, memory=5, steps=3, shift=5.0, sampler="renoise", depth=30, heads=24, head_dim=128,
        mlp_ratio=14336 / 3072, text_tokens=512, text_dim=4096, dtype=torch.bfloat16,
    ),
}
PRESET_NAMES = tuple(PRESETS)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's (t, h, w) split of the head dim: ``d - 4 (d // 6)``, ``2 (d // 6)``, ``2 (d // 6)``."""
    s = head_dim // 6
    return head_dim - 4 * s, 2 * s, 2 * s


class WanBlock(nn.Module):
    """Self-attention (keys and values optionally prefixed by a block's KV cache), prompt
    cross-attention, FFN; adaLN from ``modulation + e`` per frame."""

    def __init__(self, spec: WorldSpec) -> None:
        super().__init__()
        dim = spec.dim
        self.n_heads = spec.heads
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, spec.heads, spec.text_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = FeedForward(dim, int(dim * spec.mlp_ratio))

    def forward(self, x: torch.Tensor, e: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                text: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: (B, frames * T, D)``, ``e: (B, frames, 6, D)``, ``cache: (2, B, H, Lc, hd)`` or None.
        Returns the new hidden states and this call's keys and values ``(B, H, frames * T, hd)``."""
        frames = e.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)
        h = modulate(self.norm1(x), shift1, scale1, frames)
        q = apply_rope(heads(self.norm_q(self.q(h)), self.n_heads), *rope)
        k = apply_rope(heads(self.norm_k(self.k(h)), self.n_heads), *rope)
        v = heads(self.v(h), self.n_heads)
        keys, values = (k, v) if cache is None else (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2))
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + gate(self.o(merge_heads(attn)), gate1, frames)
        x = x + self.cross(self.norm3(x), text)
        x = x + gate(self.ffn(modulate(self.norm2(x), shift2, scale2, frames)), gate2, frames)
        return x, k, v


class MatrixGame3DiT(nn.Module):
    """The denoiser: ``forward(x, sigma, kv, context_valid, camera, actions, frame_t, text) -> velocity``.

    ``x: (B, F, C, h, w)`` the noisy chunk at noise level ``sigma`` (0-d tensor); ``kv`` the KV cache
    from ``encode_context`` for ``K`` context slots, ``context_valid: (B, K)`` bool (``None``: every
    slot valid, no mask); ``camera: (B, F, 12)``, ``actions: (B, F, 6)``, ``frame_t: (B, F)`` the
    chunk frames' latent indices (RoPE time), ``text: (B, N, text_dim)``. Returns the velocity
    ``(B, F, C, h, w)``. ``forward_full`` is the same network in upstream's form (context and chunk
    in one sequence at every step).
    """

    def __init__(self, spec: WorldSpec) -> None:
        super().__init__()
        if spec.output != "velocity":  # its sampler re-noises a clean prediction made from the velocity
            raise ValueError(f"matrix_game3 worlds predict a velocity; WorldSpec.output={spec.output!r} is "
                             "supported by hy_worldplay worlds only")
        for key in ("ray_fov_deg", "prope_unit"):  # camera encodings of the HY DiT only
            if getattr(spec, key) is not None:
                raise ValueError(f"matrix_game3 worlds take cameras through modulation; WorldSpec.{key}="
                                 f"{getattr(spec, key)!r} is supported by hy_worldplay worlds only")
        self.spec = spec
        dim, p, c = spec.dim, spec.patch, spec.latent_channels
        self.patch_in = nn.Linear(c * p * p, dim)
        self.time = Embedder(FREQ_DIM, dim)
        self.time_projection = nn.Linear(dim, 6 * dim)
        self.camera = Embedder(CAMERA_DIM, dim)
        self.action = Embedder(ACTION_DIM, dim)
        self.rope = Rope3D(rope_split(spec.head_dim), spec.grid)
        self.blocks = nn.ModuleList(WanBlock(spec) for _ in range(spec.depth))
        self.head_modulation = nn.Parameter(torch.randn(1, 1, 2, dim) / dim**0.5)
        self.head_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, c * p * p)

    def _embed(self, latents, noise_level, camera, actions, frame_t):
        """Tokens, per-frame conditioning (base and 6-way modulation) and RoPE of some frames."""
        h = self.patch_in(patchify(latents, self.spec.patch))
        cond = self.time(timestep_features(noise_level).to(h.dtype)) + self.camera(camera) + self.action(actions)
        e = self.time_projection(F.silu(cond)).unflatten(-1, (6, -1))
        return h, cond, e, self.rope(frame_t)

    def encode_context(self, context: torch.Tensor, context_valid: torch.Tensor | None, camera: torch.Tensor,
                       actions: torch.Tensor, frame_t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The KV cache of the clean context: ``(depth, 2, B, heads, K * T, head_dim)``.

        ``context: (B, K, C, h, w)`` at timestep 0, ``context_valid: (B, K)`` (``None``: all valid, no
        mask), ``camera: (B, K, 12)``, ``actions: (B, K, 6)``, ``frame_t: (B, K)``. Context frames
        attend to each other (padding masked; with no valid frame at all, to everything, so nothing
        is NaN: the chunk masks them).
        """
        b, slots = context.shape[:2]
        h, _, e, rope = self._embed(context, context.new_zeros(b, slots), camera, actions, frame_t)
        mask = None
        if context_valid is not None:
            keep = key_padding_mask(context_valid, self.spec.tokens_per_frame)
            mask = keep | ~keep.any(-1, keepdim=True)
        cache = []
        for block in self.blocks:
            h, k, v = block(h, e, rope, mask, text)
            cache.append(torch.stack([k, v]))
        return torch.stack(cache)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, kv: torch.Tensor, context_valid: torch.Tensor | None,
                camera: torch.Tensor, actions: torch.Tensor, frame_t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, chunk = x.shape[:2]
        h, cond, e, rope = self._embed(x, sigma.reshape(1, 1).expand(b, chunk), camera, actions, frame_t)
        mask = context_and_chunk_mask(context_valid, chunk, self.spec.tokens_per_frame)
        for block, cache in zip(self.blocks, kv.unbind(0)):
            h, _, _ = block(h, e, rope, mask, text, cache)
        return self._head(h, cond)

    def forward_full(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                     context_valid: torch.Tensor | None, camera: torch.Tensor, actions: torch.Tensor,
                     frame_t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The velocity ``(B, F, C, h, w)`` in upstream's form: the context frames ``context (B, K, C, h, w)``
        (timestep 0, ``context_valid (B, K)``; ``None``: all valid, no mask) and the chunk ``x`` in one
        token sequence, every token a query. ``camera: (B, K + F, 12)``, ``actions: (B, K + F, 6)``,
        ``frame_t: (B, K + F)`` (the context's latent indices, then the chunk's)."""
        b, chunk, slots = x.shape[0], x.shape[1], context.shape[1]
        noise_level = torch.cat([sigma.new_zeros(b, slots), sigma.reshape(1, 1).expand(b, chunk)], 1)
        h, cond, e, rope = self._embed(torch.cat([context, x], 1), noise_level, camera, actions, frame_t)
        mask = context_and_chunk_mask(context_valid, chunk, self.spec.tokens_per_frame)
        for block in self.blocks:
            h, _, _ = block(h, e, rope, mask, text)
        return self._head(h[:, slots * self.spec.tokens_per_frame:], cond[:, slots:])

    def _head(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The velocity ``(B, F, C, h, w)`` of the chunk from its final hidden states ``h (B, F * T, D)``
        and per-frame conditioning ``cond (B, F, D)``."""
        spec, chunk = self.spec, cond.shape[1]
        shift, scale = (self.head_modulation + cond[:, :, None]).unbind(2)
        out = self.head(modulate(self.head_norm(h), shift, scale, chunk))
        return unpatchify(out, chunk, spec.latent_channels, spec.latent_h, spec.latent_w, spec.patch)


FORMS = ("full", "cached")  # build's ``form``: upstream's full sequence (default) or the KV-cache form


class MatrixGame3(KVCacheWorld):
    """The Matrix-Game-3.0-style world in the KV-cache form: ``model`` (``MatrixGame3DiT``), its
    ``encoder`` (the KV cache pass, run once per chunk in ``inputs``) and their per-chunk inputs."""

    revisit_inputs = ("kv", "context_valid", "camera", "actions", "frame_t")

    def __init__(self, spec: WorldSpec, model: MatrixGame3DiT, text: torch.Tensor) -> None:
        self.spec, self.model, self.text = spec, model, text
        self.encoder = MethodModule(model, "encode_context")  # compiled on its own

    def inputs(self, context: Context, chunk_poses: torch.Tensor, chunk_actions: torch.Tensor,
               first_frame: int) -> dict[str, torch.Tensor]:
        """Cameras relative to the chunk's first camera; fills the KV cache from the context."""
        dtype, device = self.spec.dtype, self.device
        reference = chunk_poses[0]
        context_camera = camera_features(reference, context.poses[0])[None].to(device, dtype)
        no_action = torch.zeros(1, context.capacity, ACTION_DIM, device=device, dtype=dtype)
        kv = self.encoder(context.latents, context.valid, context_camera, no_action, context.frame_index, self.text)
        frame_t = (first_frame + torch.arange(self.spec.chunk_frames)).float()[None]
        return {
            "kv": kv,
            "context_valid": context.valid,
            "camera": camera_features(reference, chunk_poses)[None].to(device, dtype),
            "actions": chunk_actions[None].to(device, dtype),
            "frame_t": frame_t.to(device),
            "text": self.text,
        }


class MatrixGame3Full(World):
    """The Matrix-Game-3.0-style world in upstream's form: ``model`` runs ``MatrixGame3DiT.forward_full``
    (context and chunk in one sequence, every step) on the same DiT as ``MatrixGame3``."""

    revisit_inputs = ("context", "context_valid", "camera", "actions", "frame_t")

    def __init__(self, spec: WorldSpec, dit: MatrixGame3DiT, text: torch.Tensor) -> None:
        self.spec, self.text = spec, text
        self.model = MethodModule(dit, "forward_full")

    def layout(self, capacity: int | None = None) -> SequenceLayout:
        """Context slots then chunk frames; every token is a query."""
        return self.context_layout(capacity, "all")

    def inputs(self, context: Context, chunk_poses: torch.Tensor, chunk_actions: torch.Tensor,
               first_frame: int) -> dict[str, torch.Tensor]:
        """Cameras relative to the chunk's first camera, "no action" for the context frames, the
        context's latent indices then the chunk's as RoPE time (as ``MatrixGame3.inputs``)."""
        dtype, device = self.spec.dtype, self.device
        poses = torch.cat([context.poses[0], chunk_poses])
        actions = torch.cat([torch.zeros(context.capacity, ACTION_DIM), chunk_actions])[None]
        chunk_t = (first_frame + torch.arange(self.spec.chunk_frames)).float()[None].to(device)
        return {
            "context": context.latents,
            "context_valid": context.valid,
            "camera": camera_features(chunk_poses[0], poses)[None].to(device, dtype),
            "actions": actions.to(device, dtype),
            "frame_t": torch.cat([context.frame_index, chunk_t], 1),
            "text": self.text,
        }


def build(preset: str | WorldSpec = "tiny", device: Any = None, dtype: torch.dtype | None = None,
          seed: int = 0, form: str | None = None) -> MatrixGame3 | MatrixGame3Full:
    """The world of ``preset`` (a name in ``PRESETS`` or a ``WorldSpec``) with seeded random weights,
    on ``device`` (default CPU) in ``dtype`` (default: the preset's; ``full`` is bf16), in ``form``
    (``FORMS``: ``"full"``, upstream's one sequence per step, or ``"cached"``, the KV-cache form;
    None: ``"full"``, as HY's ``build`` takes None for its own default)."""
    form = "full" if form is None else form
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)} or None, got {form!r}")
    spec = resolve_spec(preset, PRESETS, dtype)
    model = init_model(MatrixGame3DiT, spec, device, seed)
    text = prompt_embedding(spec, seed, model.patch_in.weight.device)
    return MatrixGame3Full(spec, model, text) if form == "full" else MatrixGame3(spec, model, text)
