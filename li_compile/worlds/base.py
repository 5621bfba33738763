"""What every reference world is: a preset (``WorldSpec``) and the ``World`` the generation loop drives.

A ``World`` owns its denoiser ``model`` (the ``nn.Module`` a user compiles) and knows how to turn
one chunk's context (clean latent frames chosen by a context policy, padded to a fixed number of
slots) and cameras into the keyword arguments of ``model(x, sigma, **inputs)``. The loop in
``li_compile.worlds.pipeline`` does the rest: noise, sampler steps, history, timing.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from li_compile.sequence import SequenceLayout
from li_compile.worlds.decode import LatentDecoder
from li_compile.worlds.sampling import SAMPLERS, sigma_schedule


OUTPUTS = ("velocity", "x0")  # what a world's network predicts (WorldSpec.output)
X0_MIN_SIGMA = 0.05  # an "x0" network's velocity divides by sigma, clamped here (as JiT does)


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of one preset of a reference world.

    Latents: ``latent_channels x latent_h x latent_w`` per latent frame, cut into ``patch x patch``
    tokens (``tokens_per_frame``); the model generates ``chunk_frames`` latent frames per chunk from
    up to ``context_frames = memory + window`` clean context frames (retrieved memory + recent),
    with ``steps`` sampler steps (``sampler`` of ``li_compile.worlds.sampling``, timestep ``shift``).
    Transformer: ``depth`` blocks of width ``dim = heads * head_dim``, MLP ``mlp_ratio``, and
    ``text_tokens`` prompt tokens of width ``text_dim`` for cross-attention. ``dtype``: weights and
    activations. ``output``: what the network's last layer predicts, ``"velocity"`` (as the upstream
    models) or ``"x0"`` (the clean chunk, turned into the velocity ``(x - x0) / sigma`` inside
    ``forward``, so the sampler and the backend see a velocity either way; pixel-space worlds learn
    this far better, as a small network cannot copy high-dimensional noise through itself).
    ``ray_fov_deg``: when set (the lens' vertical field of view, degrees), the DiT also adds every
    token's camera rays (Plücker coordinates, ``layers.RayEmbedder``) to its input, so attention can
    match a chunk token to the context tokens that saw the same ray; ``None``: cameras enter through
    the per-frame modulation only, as in the random-weight presets. ``prope_unit``: when set,
    self-attention is camera-relative (PRoPE, ``layers.CameraRope``) on ``camera_rope_dims`` of each
    head (the rest keeps the 3D RoPE), translations measured in this many scene lengths; ``None``:
    off, as in the random-weight presets. ``block_causal``: context tokens never attend to the chunk
    (the chunk still attends to the context), so the context's keys and values do not depend on the
    chunk and can be computed once per chunk and cached (``hy_worldplay.HYWorldPlayDiT.encode_context``);
    ``False``: full bidirectional attention over context and chunk (HY-WorldPlay's own mode).
    """

    name: str
    latent_channels: int
    latent_h: int
    latent_w: int
    patch: int
    chunk_frames: int
    window: int
    memory: int
    steps: int
    shift: float
    sampler: str
    depth: int
    heads: int
    head_dim: int
    mlp_ratio: float
    text_tokens: int
    text_dim: int
    dtype: torch.dtype = torch.float32
    vae_stride: tuple[int, int, int] = (4, 16, 16)  # (time, height, width) pixels per latent
    output: str = "velocity"
    ray_fov_deg: float | None = None
    prope_unit: float | None = None
    block_causal: bool = False

    def __post_init__(self) -> None:
        for key in ("latent_channels", "latent_h", "latent_w", "patch", "chunk_frames", "window", "steps",
                    "depth", "heads", "head_dim", "text_tokens", "text_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WorldSpec.{key} must be an int >= 1, got {value!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 0:
            raise ValueError(f"WorldSpec.memory must be an int >= 0, got {self.memory!r}")
        if self.latent_h % self.patch or self.latent_w % self.patch:
            raise ValueError(
                f"latent size {self.latent_h}x{self.latent_w} must be divisible by the patch {self.patch}"
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"WorldSpec.output must be one of {list(OUTPUTS)}, got {self.output!r}")
        if self.ray_fov_deg is not None and not 0 < self.ray_fov_deg < 180:
            raise ValueError(f"WorldSpec.ray_fov_deg must be None or in (0, 180) degrees, got {self.ray_fov_deg!r}")
        if self.prope_unit is not None and not 0 < self.prope_unit < math.inf:
            raise ValueError(f"WorldSpec.prope_unit must be None or a finite number > 0, got {self.prope_unit!r}")
        if self.prope_unit is not None and self.head_dim < 8:
            raise ValueError(f"WorldSpec.prope_unit needs head_dim >= 8 (camera and RoPE halves), got {self.head_dim}")
        if not isinstance(self.block_causal, bool):
            raise ValueError(f"WorldSpec.block_causal must be a bool, got {self.block_causal!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"WorldSpec.sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def camera_rope_dims(self) -> int:
        """Leading dims of each head that attend camera-relatively (half, in 4-blocks; 0: PRoPE off)."""
        return 0 if self.prope_unit is None else self.head_dim // 2 // 4 * 4

    @property
    def context_frames(self) -> int:
        """Most context frames a chunk sees: retrieved memory plus the recent window."""
        return self.memory + self.window

    @property
    def grid(self) -> tuple[int, int]:
        """Tokens per frame along height and width."""
        return self.latent_h // self.patch, self.latent_w // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """One latent frame: ``(C, h, w)``."""
        return self.latent_channels, self.latent_h, self.latent_w

    def sigmas(self) -> torch.Tensor:
        """The sampler's noise levels ``(steps + 1,)``, from 1 to 0."""
        return sigma_schedule(self.steps, self.shift)


@dataclass
class Context:
    """The clean context of one chunk, right-aligned in ``capacity`` slots (padding first).

    ``latents: (1, capacity, C, h, w)``, ``poses: (1, capacity, 4, 4)`` (CPU float32, identity on padding),
    ``valid: (1, capacity)`` bool, or ``None`` when every slot holds a frame and the caller asked
    for no key-padding mask (``gather_context(..., mask_full=False)``); ``frame_index: (1, capacity)``
    float32 (the frame's index in the generated video; 0 on padding). ``frames`` lists the history
    indices in slot order.
    """

    latents: torch.Tensor
    poses: torch.Tensor
    valid: torch.Tensor | None
    frame_index: torch.Tensor
    frames: list[int]

    @property
    def capacity(self) -> int:
        return self.latents.shape[1]


class World:
    """A reference world: ``spec``, the denoiser ``model`` and a fixed prompt embedding ``text``.

    Subclasses implement ``layout`` and ``inputs``; ``compile`` returns a copy whose modules went
    through a compile function (e.g. ``lambda m: torch.compile(m, backend="light_interaction")``).
    """

    spec: WorldSpec
    model: nn.Module
    text: torch.Tensor
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> pictures; None: the stand-in
    # forward arguments of ``model`` derived from the cameras or the selected context: a revisit may
    # differ in them, so they stay out of the denoising-cache key (``Accelerator.configure``)
    revisit_inputs: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.text.device

    def layout(self, capacity: int | None = None) -> SequenceLayout:
        """Token layout of the model's self-attention with ``capacity`` context slots."""
        raise NotImplementedError

    def context_layout(self, capacity: int | None, queries: str, suffix_tokens: int = 0) -> SequenceLayout:
        """Context slots (``capacity``; None: the preset's ``context_frames``) then the chunk's frames on
        the preset's token grid, ``queries`` ``"all"`` or ``"chunk"``, ``suffix_tokens`` after the video."""
        slots = self.spec.context_frames if capacity is None else capacity
        grid_h, grid_w = self.spec.grid
        return SequenceLayout(slots, self.spec.chunk_frames, grid_h, grid_w, suffix_tokens=suffix_tokens, queries=queries)

    def inputs(self, context: Context, chunk_poses: torch.Tensor, chunk_actions: torch.Tensor,
               first_frame: int) -> dict[str, torch.Tensor]:
        """Keyword inputs of ``model(x, sigma, **inputs)`` for one chunk (run once per chunk)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pictures ``(N, 3, H, W)`` in [0, 1] of latents ``(N, C, h, w)``: the world's own decoder
        (the trained world's pixel codec), else the seeded stand-in for a VAE (``LatentDecoder``)."""
        if self.decoder is not None:
            return self.decoder(latents)
        return LatentDecoder(self.spec.latent_channels)(latents)

    def compiled_modules(self) -> tuple[str, ...]:
        """Names of the attributes holding modules that ``compile`` compiles."""
        return ("model",)

    def compile(self, compile_fn: Callable[[nn.Module], Callable]) -> "World":
        """A shallow copy of this world whose modules are ``compile_fn(module)``; weights are shared."""
        twin = copy.copy(self)
        for name in self.compiled_modules():
            setattr(twin, name, compile_fn(getattr(self, name)))
        return twin

    def with_model(self, model: nn.Module, call: Callable | None = None) -> "World":
        """A shallow copy of this world around ``model`` (e.g. a copy of its DiT whose blocks are
        compiled in place); ``call``: what the chunk loop calls instead of ``model`` (e.g. ``model``
        behind ``li_compile.cached``). Modules derived from the model follow it."""
        twin = copy.copy(self)
        twin.model = model if call is None else call
        return twin


class MethodModule(nn.Module):
    """One method of a module as a module of its own, so it can be compiled on its own (weights
    shared): ``MethodModule(dit, "encode_context")(*args)`` is ``dit.encode_context(*args)``.
    Worlds with a KV cache compile their context pass this way, next to the denoiser."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        if not callable(getattr(module, method, None)):
            raise ValueError(f"{type(module).__name__} has no method {method!r}")
        self.module, self.method = module, method
        self.__signature__ = inspect.signature(getattr(module, method))  # what a call binds (li_compile.cached)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


class KVCacheWorld(World):
    """A world in the KV-cache form (Matrix-Game-3.0, HY-WorldPlay AR): ``encoder`` fills the context's
    keys and values once per chunk, then ``model`` runs the chunk's tokens as queries at every step."""

    encoder: nn.Module

    def compiled_modules(self) -> tuple[str, ...]:
        return ("model", "encoder")

    def with_model(self, model: nn.Module, call: Callable | None = None) -> "World":
        twin = super().with_model(model, call)
        dit = model.module if isinstance(model, MethodModule) else model  # the encoder runs the same DiT
        twin.encoder = MethodModule(dit, "encode_context")
        return twin

    def layout(self, capacity: int | None = None) -> SequenceLayout:
        """Keys: context slots then chunk frames; queries: the chunk's tokens only (KV cache)."""
        return self.context_layout(capacity, "chunk")


def prompt_embedding(spec: WorldSpec, seed: int, device: torch.device | str | None) -> torch.Tensor:
    """A fixed random stand-in for the text encoder's output: ``(1, text_tokens, text_dim)``."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(1, spec.text_tokens, spec.text_dim, generator=gen).to(device, spec.dtype)


def resolve_spec(preset: "str | WorldSpec", presets: dict[str, WorldSpec], dtype: torch.dtype | None) -> WorldSpec:
    """The ``WorldSpec`` named ``preset`` in ``presets`` (or ``preset`` itself), with ``dtype`` if given."""
    if isinstance(preset, WorldSpec):
        spec = preset
    elif preset in presets:
        spec = presets[preset]
    else:
        raise ValueError(f"preset must be one of {sorted(presets)} or a WorldSpec, got {preset!r}")
    return spec if dtype is None else replace(spec, dtype=dtype)


def init_model(model_cls: Callable[[WorldSpec], nn.Module], spec: WorldSpec, device: Any, seed: int) -> nn.Module:
    """``model_cls(spec)`` with weights drawn from ``seed`` directly on ``device`` (default CPU),
    cast to ``spec.dtype``, in eval mode without gradients. The global RNG is left untouched."""
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = model_cls(spec)
    if spec.dtype != torch.get_default_dtype():  # only then: diffusers warns on any dtype cast
        model = model.to(spec.dtype)
    return model.to(device).eval().requires_grad_(False)
