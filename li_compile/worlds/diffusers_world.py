"""A diffusers video transformer as a world: the public chunk loop (context selection, denoising cache,
tile plans) around ``WanTransformer3DModel`` or ``HunyuanVideo15TransformerModel`` with random weights.

The upstream classes take one latent video and no cameras. ``DiffusersDenoiser`` makes one a world
denoiser, ``model(x, sigma, context, context_valid, **conditioning)``, the call every reference world has:

- the chunk's noisy frames ``x: (1, F, C, h, w)`` follow the clean context frames
  ``context: (1, S, C, h, w)`` in one latent video, as in HY-WorldPlay's full-sequence form; the
  output is the chunk's velocity, ``(1, F, C, h, w)``;
- ``context_valid: (1, S)`` bool (or None: every slot holds a frame) reaches the video
  self-attention as a key-padding mask, through a forward pre-hook on each block's self-attention
  module (``VideoKeyMask``): the upstream blocks pass no mask of their own there;
- the cameras stay outside the network: they drive the controller only (which frames are kept, the
  tile plans, which chunks are revisits).

HunyuanVideo 1.5's forward breaks its graph (``torch.all(image_embeds == 0)``, boolean indexing), so
its sampler site is skipped in the report; a light_interaction world of it calls the model through
``li_compile.cached`` (the cache at the call boundary).

    world = diffusers_world.build("tiny", model="wan")
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

import li_compile
from li_compile.sequence import SequenceLayout
from li_compile.worlds.base import Context, World, WorldSpec, init_model, prompt_embedding, resolve_spec

PRESETS: dict[str, WorldSpec] = {
    "tiny": WorldSpec(
        name="diffusers/tiny", latent_channels=4, latent_h=8, latent_w=8, patch=2, chunk_frames=2,
        window=2, memory=4, steps=4, shift=7.0, sampler="euler", depth=2, heads=2, head_dim=32,
        mlp_ratio=4.0, text_tokens=8, text_dim=32,
    ),
    "small": WorldSpec(
        name="diffusers/small", latent_channels=16, latent_h=32, latent_w=48, patch=2, chunk_frames=4,
        window=8, memory=8, steps=4, shift=7.0, sampler="euler", depth=8, heads=12, head_dim=64,
        mlp_ratio=4.0, text_tokens=32, text_dim=512, dtype=torch.bfloat16,
    ),
}
PRESET_NAMES = tuple(PRESETS)
TIMESTEP_SCALE = 1000.0  # the diffusers transformers take the flow-matching sigma times 1000
EXTRA_TEXT_TOKENS = 4  # HunyuanVideo 1.5's second text stream (ByT5) and image tokens: this many each


class VideoKeyMask:
    """The key-padding mask of one forward's video tokens, ``tokens: (B, L_video)`` bool (None: every
    token is a key), set by ``DiffusersDenoiser`` around the transformer call and read by the
    pre-hooks ``install`` puts on self-attention modules."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    def install(self, attention: nn.Module, combine: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        """Give ``attention`` (a diffusers attention module whose forward takes ``attention_mask``)
        ``combine(tokens, attention_mask)`` as its mask whenever ``tokens`` is set."""
        position = list(inspect.signature(attention.forward).parameters).index("attention_mask")
        attention.register_forward_pre_hook(_MaskHook(self, position, combine), with_kwargs=True)


class _MaskHook:
    """The pre-hook ``VideoKeyMask.install`` registers: an object, not a closure, so that a deep copy
    of the model (``copy.deepcopy``, ``sharing_weights``) reads the copy's ``VideoKeyMask``, not the
    original's."""

    def __init__(self, keys: VideoKeyMask, position: int, combine: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        self.keys, self.position, self.combine = keys, position, combine

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tokens, position = self.keys.tokens, self.position
        if tokens is None:
            return args, kwargs
        if len(args) > position:
            args = (*args[:position], self.combine(tokens, args[position]), *args[position + 1:])
        else:
            kwargs = {**kwargs, "attention_mask": self.combine(tokens, kwargs.get("attention_mask"))}
        return args, kwargs


def _key_mask(tokens: torch.Tensor, attention_mask: Any) -> torch.Tensor:
    """Wan's self-attention (no mask of its own): ``(B, 1, 1, L)`` over the keys."""
    if attention_mask is not None:
        raise ValueError("Wan's self-attention got a mask of its own; the video key mask would replace it")
    return tokens[:, None, None, :]


def _token_mask_prefix(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """HunyuanVideo 1.5's joint attention takes a per-token mask of the text tokens after the video's
    and pads it with True in front: the video's own mask goes in front instead."""
    return torch.cat([tokens, attention_mask.bool()], dim=1)


@dataclass(frozen=True)
class UpstreamModel:
    """How one diffusers class is built from a ``WorldSpec`` and called: ``config(spec)`` its keyword
    arguments, ``self_attention(transformer)`` its video self-attention modules with the mask form
    they take, ``extra_tokens`` text tokens joined after the video tokens (suffix of the layout),
    ``graph_breaks``: its forward splits into several graphs (cache at the call boundary)."""

    class_name: str
    config: Callable[[WorldSpec], dict[str, Any]]
    self_attention: Callable[[nn.Module], list[nn.Module]]
    combine: Callable[[torch.Tensor, Any], torch.Tensor]
    extra_tokens: Callable[[WorldSpec], int]
    graph_breaks: bool


def _wan_config(spec: WorldSpec) -> dict[str, Any]:
    return dict(patch_size=(1, spec.patch, spec.patch), num_attention_heads=spec.heads,
                attention_head_dim=spec.head_dim, in_channels=spec.latent_channels,
                out_channels=spec.latent_channels, text_dim=spec.text_dim, freq_dim=min(256, spec.text_dim),
                ffn_dim=int(spec.dim * spec.mlp_ratio), num_layers=spec.depth, rope_max_seq_len=1024)


def _hunyuan_video_15_config(spec: WorldSpec) -> dict[str, Any]:
    time_dims = spec.head_dim // 4 // 2 * 2  # RoPE over (t, h, w): even parts summing to the head dim
    space_dims = (spec.head_dim - time_dims) // 2
    if time_dims + 2 * space_dims != spec.head_dim or space_dims % 2:
        raise ValueError(f"HunyuanVideo 1.5 needs a head dim that splits into even RoPE parts, got {spec.head_dim}")
    return dict(in_channels=2 * spec.latent_channels + 1, out_channels=spec.latent_channels,
                num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, num_layers=spec.depth,
                num_refiner_layers=1, patch_size=spec.patch, text_embed_dim=spec.text_dim,
                text_embed_2_dim=spec.text_dim, image_embed_dim=spec.text_dim,
                rope_axes_dim=(time_dims, space_dims, space_dims), task_type="t2v")


MODELS: dict[str, UpstreamModel] = {
    "wan": UpstreamModel("WanTransformer3DModel", _wan_config, lambda t: [b.attn1 for b in t.blocks], _key_mask,
                         lambda spec: 0, graph_breaks=False),
    "hunyuan_video_15": UpstreamModel(
        "HunyuanVideo15Transformer3DModel", _hunyuan_video_15_config,
        lambda t: [b.attn for b in t.transformer_blocks], _token_mask_prefix,
        lambda spec: spec.text_tokens + 2 * EXTRA_TEXT_TOKENS, graph_breaks=True),
}


class DiffusersDenoiser(nn.Module):
    """``transformer`` (a diffusers video transformer named in ``MODELS``) as a world denoiser:
    ``forward(x, sigma, context, context_valid, text) -> velocity`` with ``x: (1, F, C, h, w)``,
    ``sigma`` a 0-dim tensor, ``context: (1, S, C, h, w)``, ``context_valid: (1, S)`` bool or None,
    ``text: (1, T, D)``; returns ``(1, F, C, h, w)``."""

    def __init__(self, transformer: nn.Module, kind: str, tokens_per_frame: int) -> None:
        super().__init__()
        self.transformer, self.kind, self.tokens_per_frame = transformer, kind, tokens_per_frame
        self.key_mask = VideoKeyMask()
        for attention in MODELS[kind].self_attention(transformer):
            self.key_mask.install(attention, MODELS[kind].combine)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                context_valid: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        slots = context.shape[1]
        video = torch.cat([context, x], dim=1).transpose(1, 2)  # (1, C, S + F, h, w)
        if context_valid is None:
            self.key_mask.tokens = None
        else:
            chunk = torch.ones(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
            frames = torch.cat([context_valid, chunk], dim=1)
            self.key_mask.tokens = frames.repeat_interleave(self.tokens_per_frame, dim=1)
        timestep = (sigma * TIMESTEP_SCALE).reshape(1).expand(x.shape[0])
        try:
            out = self._call_upstream(video, timestep, text)
        finally:  # a direct call of the transformer later must not see this forward's mask
            self.key_mask.tokens = None
        return out[:, :, slots:].transpose(1, 2)

    def _call_upstream(self, video: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.kind == "wan":
            return self.transformer(video, timestep, text, return_dict=False)[0]
        batch, channels, *frames = video.shape
        condition = video.new_zeros(batch, channels + 1, *frames)  # t2v: no image latents, mask channel 0
        text_2 = text[:, :EXTRA_TEXT_TOKENS]
        image = torch.zeros_like(text[:, :EXTRA_TEXT_TOKENS])
        ones = torch.ones(batch, text.shape[1], device=video.device)
        return self.transformer(torch.cat([video, condition], dim=1), timestep, text, ones,
                                encoder_hidden_states_2=text_2, encoder_attention_mask_2=ones[:, :EXTRA_TEXT_TOKENS],
                                image_embeds=image, return_dict=False)[0]


class DiffusersWorld(World):
    """A world around ``DiffusersDenoiser``: context slots then chunk frames in one video, every token
    a query; HunyuanVideo 1.5's text tokens follow the video's in its joint attention."""

    revisit_inputs = ("context", "context_valid")

    def __init__(self, spec: WorldSpec, model: DiffusersDenoiser, text: torch.Tensor) -> None:
        self.spec, self.model, self.text = spec, model, text

    def layout(self, capacity: int | None = None) -> SequenceLayout:
        """Context slots then chunk frames, every token a query, then HunyuanVideo 1.5's text tokens."""
        return self.context_layout(capacity, "all", MODELS[self.model.kind].extra_tokens(self.spec))

    def inputs(self, context: Context, chunk_poses: torch.Tensor, chunk_actions: torch.Tensor,
               first_frame: int) -> dict[str, torch.Tensor]:
        """The context frames and their validity, and the prompt (cameras and actions unused)."""
        return {"context": context.latents, "context_valid": context.valid, "text": self.text}

    def compile(self, compile_fn: Callable[[nn.Module], Callable]) -> "World":
        """As ``World.compile``; a light_interaction model whose forward breaks its graph is called
        through ``li_compile.cached`` (its accelerator is the compiled model's)."""
        twin = super().compile(compile_fn)
        if MODELS[self.model.kind].graph_breaks and _is_light_interaction(twin.model):
            twin.model = li_compile.cached(twin.model, latent="x", timestep="sigma")
        return twin


def _is_light_interaction(compiled: Any) -> bool:
    try:
        li_compile.accelerator(compiled)
    except ValueError:
        return False
    return True


def build(preset: str | WorldSpec = "tiny", device: Any = None, dtype: torch.dtype | None = None,
          seed: int = 0, model: str = "wan") -> DiffusersWorld:
    """The world of ``preset`` around the diffusers class ``MODELS[model]`` with seeded random weights,
    on ``device`` (default CPU) in ``dtype`` (default: the preset's). Needs ``diffusers``."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("the diffusers world needs diffusers: pip install -e '.[diffusers]'") from err
    spec = resolve_spec(preset, PRESETS, dtype)
    upstream = MODELS[model]
    transformer = init_model(lambda s: getattr(diffusers, upstream.class_name)(**upstream.config(s)), spec, device, seed)
    denoiser = DiffusersDenoiser(transformer, model, spec.tokens_per_frame)
    return DiffusersWorld(spec, denoiser, prompt_embedding(spec, seed, transformer.device))
