"""The trained presets of the HY-WorldPlay-style world: their sizes and their verified weights.

Two worlds trained on rendered rooms (the renderer, the recipe and the training scripts live in
the repository's ``training/`` folder, not in the installed package), same code path as the
random-weight presets (``hy_worldplay.HYWorldPlayDiT``):

- ``trained`` (``TRAINED_SPEC``): 64x64 frames, 8 x 8 tokens per frame, chunks of 4 frames with
  4 recent + 4 memory context frames, full bidirectional attention over context and chunk.
- ``trained_ar`` (``TRAINED_AR_SPEC``): 128x128 frames, 16 x 16 tokens per frame, chunks of 4 frames
  with 8 recent + 4 memory context frames, block-causal (the context never attends to the chunk),
  so it runs in both sequence forms: ``form="full"`` (the context re-processed with the chunk at
  every step) and ``form="cached"`` (the context's keys and values computed once per chunk, as
  HY-WorldPlay's and Matrix-Game-3.0's AR inference do).

Frames become latents by pixel patches (``PixelPatchCodec``, stride ``PIXEL_STRIDE``), the DiT's
patch 2 makes the tokens. Shipped weights are float16, listed with their SHA-256 in
``weights/SHA256SUMS``; ``load_weights`` refuses a shipped file whose hash differs from its record
and any weights with a non-finite value.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from li_compile.worlds.base import WorldSpec
from li_compile.worlds.hy_worldplay import HYWorldPlay, HYWorldPlayCached, build, world_of
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.trajectories import FOV_Y_DEG

PIXEL_STRIDE = 4  # pixels per latent along each axis (both trained worlds)
IMAGE_SIZE = 64  # the trained world's frames are IMAGE_SIZE x IMAGE_SIZE RGB
AR_IMAGE_SIZE = 128  # the trained_ar world's
MODEL_SEED = 0  # build(seed=...) of the trained worlds: initial weights and the fixed prompt embedding
WEIGHTS_DIR = Path(__file__).parent / "weights"
CHECKSUMS = WEIGHTS_DIR / "SHA256SUMS"  # "<sha256>  <file name>" per shipped weights file
WEIGHTS_PATH = WEIGHTS_DIR / "hy_trained.pt"
AR_WEIGHTS_PATH = WEIGHTS_DIR / "hy_trained_ar.pt"
AR_TRAIN_COMMAND = "bash training/run_trained_ar.sh"

TRAINED_SPEC = WorldSpec(
    name="hy_worldplay/trained", latent_channels=3 * PIXEL_STRIDE**2, latent_h=IMAGE_SIZE // PIXEL_STRIDE,
    latent_w=IMAGE_SIZE // PIXEL_STRIDE, patch=2, chunk_frames=4, window=4, memory=4, steps=4, shift=7.0,
    sampler="euler", depth=6, heads=6, head_dim=32, mlp_ratio=4.0, text_tokens=1, text_dim=32,
    vae_stride=(1, PIXEL_STRIDE, PIXEL_STRIDE), output="x0", prope_unit=4.0,
)
TRAINED_AR_SPEC = replace(
    TRAINED_SPEC, name="hy_worldplay/trained_ar", latent_h=AR_IMAGE_SIZE // PIXEL_STRIDE,
    latent_w=AR_IMAGE_SIZE // PIXEL_STRIDE, window=8, memory=4, block_causal=True,
)


def image_size(spec: WorldSpec) -> int:
    """Frame side in pixels of a trained world's ``spec`` (square frames, ``PIXEL_STRIDE`` per latent)."""
    return spec.latent_h * PIXEL_STRIDE


def sha256_of(path: Path | str) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(name: str, checksums: Path | str | None = None) -> str | None:
    """The SHA-256 recorded for weights file ``name`` in ``checksums`` (``sha256sum`` format; default
    the shipped ``SHA256SUMS``), or None."""
    path = Path(checksums or CHECKSUMS)
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return parts[0].lower()
    return None


def load_weights(path: Path | str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A ``state_dict`` read from ``path`` (on the CPU, tensors only), checked before use.

    The file's SHA-256 must equal ``sha256``; with none given, a file in the shipped weights folder
    must match its ``SHA256SUMS`` record (a shipped file without a record is refused too), while a
    file elsewhere (your own training run) is not hash-checked. Every floating tensor must be finite.
    Raises ``FileNotFoundError`` or ``ValueError`` naming the file and what was expected."""
    path = Path(path)
    if not path.exists():
        hint = f"; train it with `{AR_TRAIN_COMMAND}`" if path.name == AR_WEIGHTS_PATH.name else ""
        raise FileNotFoundError(f"weights file {path} does not exist{hint}")
    if sha256 is None and path.resolve().parent == WEIGHTS_DIR.resolve():
        sha256 = recorded_sha256(path.name)
        if sha256 is None:
            raise ValueError(f"shipped weights {path.name} have no SHA-256 record in {CHECKSUMS}: add "
                             f"'<sha256>  {path.name}' (sha256sum {path.name}) after checking the file")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            raise ValueError(f"weights {path} have SHA-256 {actual}, expected {sha256.lower()}: "
                             "the file is corrupt or not the recorded one")
    weights = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"weights {path} must hold a state_dict (name -> tensor), got {type(weights).__name__}")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"weights {path} hold non-finite values (NaN or inf) in {len(bad)} tensors, e.g. "
                         f"{bad[:3]}; expected finite weights")
    return weights


def spec_of_weights(weights: dict[str, torch.Tensor], spec: WorldSpec = TRAINED_SPEC) -> WorldSpec:
    """``spec`` with the sizes ``weights`` (a ``state_dict``) were trained at: the number of heads
    (of ``spec.head_dim``), of blocks, whether the DiT embeds camera rays (for ``spec``'s lens,
    else the trajectories' ``FOV_Y_DEG``) and its camera-relative attention's unit. What the
    network predicts (``output``) and its attention mask (``block_causal``) cannot be read from
    weights: ``spec`` keeps them."""
    width = weights["patch_in.weight"].shape[0]
    if width % spec.head_dim:
        raise ValueError(f"weights of width {width} do not split into heads of {spec.head_dim}")
    depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    rays = "rays.proj.weight" in weights
    unit = weights.get("prope.unit")
    return replace(spec, heads=width // spec.head_dim, depth=depth,
                   ray_fov_deg=(spec.ray_fov_deg or FOV_Y_DEG) if rays else None,
                   prope_unit=None if unit is None else float(unit))


def load_trained(device: torch.device | str | None = None, path: Path | str = WEIGHTS_PATH,
                 spec: WorldSpec = TRAINED_SPEC, form: str | None = None,
                 sha256: str | None = None) -> HYWorldPlay | HYWorldPlayCached:
    """A trained world with the shipped (or given) weights, in eval mode without gradients
    (``spec``: the preset the weights were trained as, e.g. ``output="velocity"`` for that ablation;
    its sizes and camera rays follow the weights, ``spec_of_weights``; ``form``: ``hy_worldplay.build``'s;
    ``sha256``: ``load_weights``'). Frames decode through the pixel codec."""
    weights = load_weights(path, sha256)
    spec = spec_of_weights(weights, spec)
    world = build(spec, device=device, seed=MODEL_SEED, form="full")  # world.model: the DiT itself
    world.model.load_state_dict(weights)
    world = world_of(spec, world.model, world.text, form)
    world.decoder = PixelPatchCodec(PIXEL_STRIDE).decode
    return world


def load_trained_ar(device: torch.device | str | None = None, path: Path | str = AR_WEIGHTS_PATH,
                    form: str | None = None, sha256: str | None = None) -> HYWorldPlay | HYWorldPlayCached:
    """The ``trained_ar`` world (``TRAINED_AR_SPEC``) with its shipped (or given) weights, by
    default in its deployment form (``form="cached"``); ``form="full"`` gives the same function
    with the context re-processed at every step."""
    return load_trained(device, path, TRAINED_AR_SPEC, form, sha256)


def untrained(spec: WorldSpec, device: torch.device | str | None = None,
              form: str | None = None) -> HYWorldPlay | HYWorldPlayCached:
    """A world of a trained preset's ``spec`` with its seeded initial weights instead of trained
    ones (CPU tests, and the start of training), decoding through the pixel codec."""
    world = build(spec, device=device, seed=MODEL_SEED, form=form)
    world.decoder = PixelPatchCodec(PIXEL_STRIDE).decode
    return world

