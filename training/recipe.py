"""The training recipe of the trained HY-WorldPlay-style worlds (``li_compile.worlds.trained``).

Same code path as the other presets: ``hy_worldplay.build(TRAINED_SPEC)`` builds the very
``HYWorldPlayDiT`` the examples compile, here small (6 blocks, width 192, 64 tokens per frame) and
trained on rendered rooms (``training.scenes``) instead of random. ``trained_ar``
(``TRAINED_AR_SPEC``, block-causal, 16 x 16 tokens per frame) trains with the same recipe, through
its KV-cache form (``training_denoiser``). Frames become latents
by pixel patches (``PixelPatchCodec``, stride 4: 64x64 RGB -> 48 x 16 x 16), the DiT's patch 2
makes 8 x 8 tokens per latent frame; a chunk is 4 frames with a context of 4 recent + 4 memory
frames retrieved by camera overlap (``DensePolicy``).

Training is flow matching (``x_sigma = (1 - sigma) x0 + sigma noise``) with the network predicting
the clean chunk (``output="x0"``, scored by its squared error; a network of this width cannot copy
192-dimensional pixel-patch noise through itself, so a velocity network leaves the noise in its
frames: ``--output velocity`` of ``training/train_world.py`` is that ablation) on teacher-forced
chunks (``training.data.sample_batch``), AdamW with warm-up and cosine decay, bf16 autocast on
CUDA, an exponential moving average of the weights (exported). The model takes one ``sigma`` per
call, so each step splits its batch into ``sigma_groups`` groups: one at ``sigma = 1`` (the
sampler's first step, which decides the content) and the rest at stratified levels drawn with a
timestep shift (``sigma_shift``). The sampler runs 4 Euler steps with shift 7 as the other
HY-WorldPlay presets (``benchmarks/trained_diagnostics.py --probes steps`` compares shifts on the
shipped weights). Checkpoints make it resumable; a
fixed ``seed`` fixes data, noise and initialisation.

Self-forcing (off by default): with ``rollout_fraction`` > 0, that share of each batch reads its
context from clips the world itself generated (``roll_out``: the generation loop, batched over
clips, with the current weights), so training sees the blurred context that generation feeds it;
``init`` starts such a run from trained weights. Measured as a second stage from the shipped
weights it did not pay (``benchmarks/results/trained_world.md``), so the shipped weights do not use it.

Two more options aimed at bringing a remembered view back exactly, both off by default for the same
reason (measured in that file): ``revisit_fraction`` trains that share of the teacher-forced examples
with the chunk's own frames in its memory slots, and a spec with ``ray_fov_deg`` gives every token
its camera rays (``layers.RayEmbedder``); ``load_trained`` reads the latter, the width and the depth
from the weights (``spec_of_weights``).

Two aimed at attention itself are on in the shipped recipe: ``qk_gain`` 2 starts the QK RMSNorm
weights above 1 so attention can be sharp from the first step (``new_world``), and the spec's
``prope_unit`` makes half of each head's self-attention camera-relative (PRoPE, ``layers.CameraRope``,
read from the weights). With ``compile`` (on by default in ``training/train_world.py`` on CUDA)
that recipe trains 2.6x faster, and 3122 steps of it are the first weights more than 2 dB better
than repeating the last frame (``benchmarks/results/trained_world.md``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from li_compile.worlds.base import MethodModule, WorldSpec
from li_compile.worlds.hy_worldplay import HYWorldPlay, HYWorldPlayDiT, build
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.sampling import sampler_update
from li_compile.worlds.trained import MODEL_SEED, PIXEL_STRIDE, TRAINED_SPEC
from training import data_parallel
from training.data import ClipPool, Rollouts, chunk_inputs, make_pool, sample_batch

SPEED_WARMUP_STEPS = 20  # with a time budget: steps not timed (lazy initialisation, autotuning) ...
SPEED_PROBE_STEPS = 120  # ... then the speed of the steps up to this one sets the schedule's length


@dataclass
class TrainConfig:
    """Hyper-parameters of ``train`` (defaults: the shipped weights' run on one H200; that run's
    ``--time-budget`` resolved the schedule's length, recorded in its ``train.json``)."""

    steps: int = 12000
    batch: int = 192
    sigma_groups: int = 4
    lr: float = 6e-4
    warmup: int = 300
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    sigma_shift: float = 2.0  # timestep shift of the training noise levels (the sampler's is TRAINED_SPEC.shift)
    clips: int = 4096
    clip_frames: int = 32
    seed: int = 0
    checkpoint_every: int = 1000
    init: str = ""  # weights to start from (``export_weights``' file; "": fresh), e.g. a second stage's
    rollout_fraction: float = 0.0  # share of each batch whose context the world generated itself ...
    rollout_clips: int = 64  # ... in this many clips (``roll_out``) ...
    rollout_every: int = 4  # ... generated afresh every this many steps
    revisit_fraction: float = 0.0  # share of teacher-forced examples whose memory is the chunk's own frames
    qk_gain: float = 2.0  # initial QK RMSNorm weight (new_world): how sharp attention can start
    compile: bool = False  # train through torch.compile (Inductor): same maths, fewer kernel launches

    def __post_init__(self) -> None:
        if not self.qk_gain > 0:
            raise ValueError(f"TrainConfig.qk_gain must be > 0, got {self.qk_gain!r}")
        for key in ("steps", "batch", "sigma_groups", "clips", "checkpoint_every", "rollout_clips", "rollout_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"TrainConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch % self.sigma_groups:
            raise ValueError(f"TrainConfig.batch {self.batch} must be divisible by sigma_groups {self.sigma_groups}")
        for key in ("rollout_fraction", "revisit_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"TrainConfig.{key} must be in [0, 1], got {getattr(self, key)}")


@dataclass
class TrainState:
    """What ``train`` returns and checkpoints: the world, the running average of its weights
    ``ema`` (started at zero: read it through ``averaged_weights``), the length
    of the schedule (``config.steps``, or resolved from a time budget), the step reached, the loss
    of every step, and the seconds spent training."""

    world: HYWorldPlay
    ema: dict[str, torch.Tensor]
    total_steps: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def new_world(device: torch.device | str, spec: WorldSpec = TRAINED_SPEC, qk_gain: float = 1.0) -> HYWorldPlay:
    """A world of ``spec`` with fresh trainable weights (DiT init: adaLN and output zeroed, so
    every block starts as the identity; the self-attention's QK RMSNorm weights start at ``qk_gain``).

    QK RMSNorm bounds an attention logit by ``gain_q * gain_k * sqrt(head_dim)`` (on the RoPE dims;
    PRoPE's camera matrices are not rotations and rescale its share): about 5.7 for the
    trained preset's heads of 32 at gain 1. Against 767 keys orthogonal to the query, one key then
    gets at most 27% of the weight: too flat to copy a remembered token. Gain ``sqrt(2)`` gives heads
    of 32 the bound heads of 128 have at gain 1 (11.3); the shipped weights start at 2
    (``TrainConfig.qk_gain``; measured in ``benchmarks/results/trained_world.md``)."""
    if not qk_gain > 0:
        raise ValueError(f"qk_gain must be > 0, got {qk_gain!r}")
    world = build(spec, device=device, seed=MODEL_SEED, form="full")  # world.model: the DiT itself
    model = world.model.float().train().requires_grad_(True)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mod") or name in ("final_mod", "patch_out"):
                module.weight.zero_()
                module.bias.zero_()
            if name.endswith(("q_norm", "k_norm")):
                module.weight.fill_(qk_gain)
    return world


def averaged_weights(state: TrainState, decay: float) -> dict[str, torch.Tensor]:
    """The exponential moving average of the weights, bias-corrected as Adam's moments are.

    ``state.ema`` starts at zero, so after ``t`` steps it holds ``(1 - decay^t)`` of the average;
    dividing by that gives weights of the right scale however short the run. (An average started
    at the initial weights instead keeps ``decay^t`` of them: 12% after 2129 steps at 0.999.)
    Buffers (settings such as ``CameraRope``'s unit) are not averaged: they come as the model holds them.
    """
    if state.step == 0:
        raise ValueError("no training step was taken: there is no average yet")
    buffers = dict(state.world.model.named_buffers())
    return {k: buffers[k].detach().clone() if k in buffers else v / (1 - decay**state.step)
            for k, v in state.ema.items()}


def export_weights(weights: dict[str, torch.Tensor], path: Path | str) -> None:
    """Save weights (e.g. ``averaged_weights``) as float16 (half the bytes; exact enough here);
    scalars (settings such as ``CameraRope``'s unit) keep their precision."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() if v.dim() == 0 else v.detach().half().cpu() for k, v in weights.items()}, path)


def training_sigmas(groups: int, shift: float, generator: torch.Generator) -> list[float]:
    """Noise levels of one step's groups: ``1.0`` first, then stratified uniform ``t`` shifted
    as a sampler schedule is (``shift t / (1 + (shift - 1) t)``)."""
    t = (torch.arange(groups - 1) + torch.rand(groups - 1, generator=generator)) / max(1, groups - 1)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return [1.0] + sigmas.clamp(1e-3, 1.0).tolist()


def training_denoiser(model: HYWorldPlayDiT) -> nn.Module:
    """The module training calls with ``model.forward``'s inputs: ``model`` itself, or for a
    block-causal world its KV-cache form ``forward_via_cache`` (the same function, cheaper: the
    context attends to itself, the chunk to both, and no ``(L, L)`` mask is built)."""
    return MethodModule(model, "forward_via_cache") if model.spec.block_causal else model


def flow_matching_loss(world: HYWorldPlay, batch: dict[str, torch.Tensor], sigma: float,
                       generator: torch.Generator, denoiser: Callable | None = None) -> torch.Tensor:
    """Mean squared error of one noised chunk batch: of the clean chunk for an ``output="x0"``
    world (the velocity loss would weigh noise level ``sigma`` by ``1 / sigma^2``, spending the
    model on nearly clean inputs the 4-step sampler never visits), else of the velocity.
    ``denoiser``: what computes the model (default ``world.model``; ``train`` passes its compiled,
    possibly DDP-wrapped ``training_denoiser``)."""
    x0 = batch["target"]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x = (1 - sigma) * x0 + sigma * noise
    text = world.text.expand(x0.shape[0], -1, -1)
    inputs = {k: v for k, v in batch.items() if k != "target"}
    velocity = (world.model if denoiser is None else denoiser)(x, torch.tensor(sigma, device=x0.device), text=text, **inputs).float()
    if world.spec.output == "x0":  # score the clean prediction itself: every noise level weighs alike
        return F.mse_loss(x - sigma * velocity, x0)
    return F.mse_loss(velocity, noise - x0)


@torch.no_grad()
def roll_out(world: HYWorldPlay, pool: ClipPool, clips: torch.Tensor, codec: PixelPatchCodec,
             noise: Callable[[int], torch.Tensor]) -> Rollouts:
    """Generate pool clips ``clips (R,)`` as the generation loop does, batched over the clips:
    from each clip's true first chunk, every later chunk by the world's sampler with the dense
    context (``pool.slots``) of the frames generated before it. ``noise(c)``: chunk ``c``'s noise,
    ``(steps + 1, R, F, C, h, w)`` as ``pipeline.chunk_noise`` lays it out for one clip."""
    spec, per_chunk = world.spec, world.spec.chunk_frames
    latents = codec.encode(pool.frames[clips].float() / 255)  # chunk 0 stays true; the rest is replaced
    sigmas = spec.sigmas().to(latents.device)
    text = world.text.expand(len(clips), -1, -1)
    for c in range(1, pool.slots.shape[1]):
        chunk = torch.full_like(clips, c)
        slots = pool.slots[clips, c]
        context = latents[torch.arange(len(clips), device=clips.device)[:, None], slots.clamp_min(0)]
        inputs = chunk_inputs(pool, clips, chunk, slots, context, spec, codec)
        del inputs["target"]
        steps_noise = noise(c)
        x = steps_noise[0]
        for s in range(spec.steps):
            v = world.model(x, sigmas[s], text=text, **inputs).float()
            x = sampler_update(spec.sampler, x, v, sigmas[s], sigmas[s + 1], steps_noise[s + 1])
        latents[:, c * per_chunk:(c + 1) * per_chunk] = x
    return Rollouts(clips, latents)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_fraction`` of ``lr`` at ``total_steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, total_steps - config.warmup))
    floor = config.final_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _split(batch: dict[str, torch.Tensor], groups: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i::groups] for k, v in batch.items()} for i in range(groups)]


def train(config: TrainConfig, device: torch.device | str, checkpoint: Path | str | None = None,
          time_budget_s: float | None = None, on_step: Callable[[TrainState], None] | None = None,
          pool: ClipPool | None = None, spec: WorldSpec = TRAINED_SPEC) -> TrainState:
    """Train a world of ``spec`` (default: the trained preset) from ``config``, resuming from
    ``checkpoint`` when it exists. Frames are ``PIXEL_STRIDE`` times the latent size.

    Renders the clip pool (or uses ``pool``), then runs ``config.steps`` steps, saving to
    ``checkpoint`` every ``checkpoint_every`` steps and at the end. With ``time_budget_s`` the
    schedule's length is resolved once, after ``SPEED_PROBE_STEPS`` steps, from the measured
    speed (at most ``config.steps``; ``state.total_steps`` records it: pass it as ``steps`` to
    reproduce the run without a budget; resuming without a budget runs to ``config.steps``).
    ``on_step`` is called after every step (progress bars). ``config.init``: start from those
    weights (a fresh run only; a checkpoint wins). With ``config.rollout_fraction`` > 0 that share
    of every batch reads its context from ``roll_out`` clips of the current weights (self-forcing),
    generated afresh every ``rollout_every`` steps and at every start or resume (a resumed run
    then draws other data than an uninterrupted one). Returns the state with the EMA weights.

    Under ``torchrun`` (a process group initialised, ``data_parallel``) every process trains on its
    own batches of ``config.batch`` and torch's ``DistributedDataParallel`` averages the gradients,
    so the weights stay identical;
    the recorded loss is the processes' mean and process 0 writes the checkpoint.
    """
    device = torch.device(device)
    codec = PixelPatchCodec(PIXEL_STRIDE)
    world = new_world(device, spec, config.qk_gain)
    model = world.model
    if config.init:
        model.load_state_dict(torch.load(config.init, map_location=device, weights_only=True))
    processes = data_parallel.world_size()
    # what the steps call: the DiT (or its KV-cache form), under torchrun wrapped in torch's DDP
    # (gradients averaged during backward), then compiled; ``model`` keeps the plain state_dict keys
    ddp = DistributedDataParallel(training_denoiser(model)) if processes > 1 else None
    denoiser = training_denoiser(model) if ddp is None else ddp
    if config.compile:
        denoiser = torch.compile(denoiser, dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.99), fused=device.type == "cuda")
    me = data_parallel.rank()
    seed = data_parallel.rank_seed(config.seed, me)
    data_gen = torch.Generator(device=device).manual_seed(seed)
    sigma_gen = torch.Generator().manual_seed(seed + 1)
    state = TrainState(world, {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, config.steps)
    path = Path(checkpoint) if checkpoint is not None else None
    exists = path is not None and path.exists()
    if data_parallel.agree_min(int(exists), device) != int(exists):
        raise ValueError(f"checkpoint {path} is visible to some training processes only: they need one shared folder")
    if exists:
        # read on the CPU, where the random states live; weights and moments move to ``device`` below
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("processes", 1) != processes:
            raise ValueError(f"checkpoint {path} was written by {saved.get('processes', 1)} training processes; "
                             f"resume it with as many, not {processes}")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.ema = {k: v.to(device) for k, v in saved["ema"].items()}
        state.step, state.losses = saved["step"], saved["losses"]
        state.seconds = saved["seconds"]
        state.total_steps = saved["total_steps"] if time_budget_s is not None else config.steps
        data_rng, sigma_rng = (saved["data_rng"], saved["sigma_rng"]) if me == 0 else saved["other_rngs"][me - 1]
        data_gen.set_state(data_rng)
        sigma_gen.set_state(sigma_rng)
    pool = pool or make_pool(config.clips, config.clip_frames, spec, config.seed, device, spec.latent_h * PIXEL_STRIDE)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    live = model.state_dict()
    params, averages = [live[k] for k in state.ema], list(state.ema.values())
    start = time.perf_counter() - state.seconds
    warm_seconds = 0.0
    rolled = round(config.batch * config.rollout_fraction)
    rollouts = None
    while state.step < state.total_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, state.step, state.total_steps)
        if rolled and (rollouts is None or state.step % config.rollout_every == 0):
            with autocast:
                rollouts = _fresh_rollouts(world, pool, config.rollout_clips, codec, data_gen)
        batch = _batch(pool, config, rolled, rollouts, spec, codec, data_gen)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        sigmas = training_sigmas(config.sigma_groups, config.sigma_shift, sigma_gen)
        for group, (part, sigma) in enumerate(zip(_split(batch, config.sigma_groups), sigmas)):
            last = group == config.sigma_groups - 1  # DDP all-reduces the accumulated gradients once, here
            with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                with autocast:
                    loss = flow_matching_loss(world, part, sigma, data_gen, denoiser) / config.sigma_groups
                loss.backward()
            total += loss.detach()  # read once per step: the GPU is not waited for per group
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(averages, params, 1 - config.ema)
        state.step += 1
        state.losses.append(data_parallel.mean_across(total.item(), device))
        state.seconds = time.perf_counter() - start
        if time_budget_s is not None and state.step == SPEED_WARMUP_STEPS:
            warm_seconds = state.seconds
        if time_budget_s is not None and state.step == SPEED_PROBE_STEPS:
            per_step = (state.seconds - warm_seconds) / (SPEED_PROBE_STEPS - SPEED_WARMUP_STEPS)
            left = int((time_budget_s - state.seconds) / per_step)
            state.total_steps = data_parallel.agree_min(max(state.step, min(config.steps, state.step + left)), device)
        if on_step is not None:
            on_step(state)
        if path is not None and (state.step % config.checkpoint_every == 0 or state.step == state.total_steps):
            _save(path, state, optimizer, data_gen, sigma_gen, config)
    return state


def _fresh_rollouts(world: HYWorldPlay, pool: ClipPool, count: int, codec: PixelPatchCodec,
                    generator: torch.Generator) -> Rollouts:
    """``roll_out`` of ``count`` random pool clips with noise from ``generator``."""
    device, spec = pool.frames.device, world.spec
    clips = torch.randint(0, len(pool), (count,), generator=generator, device=device)
    shape = (spec.steps + 1, count, spec.chunk_frames, *spec.latent_shape)
    return roll_out(world, pool, clips, codec, lambda c: torch.randn(shape, generator=generator, device=device))


def _batch(pool: ClipPool, config: TrainConfig, rolled: int, rollouts: Rollouts | None, spec: WorldSpec,
           codec: PixelPatchCodec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``config.batch`` examples: ``batch - rolled`` teacher-forced (``revisit_fraction`` of them
    exact revisits), then ``rolled`` with generated context."""
    parts = []
    if rolled < config.batch:
        parts.append(sample_batch(pool, config.batch - rolled, spec, codec, generator,
                                  revisit_fraction=config.revisit_fraction))
    if rolled:
        parts.append(sample_batch(pool, rolled, spec, codec, generator, rollouts))
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def _save(path: Path, state: TrainState, optimizer: torch.optim.Optimizer, data_gen: torch.Generator,
          sigma_gen: torch.Generator, config: TrainConfig) -> None:
    """Write a resumable checkpoint atomically (temp file, then rename); with several processes,
    process 0 writes it with every process's random states, and every process (all must call
    this) returns once it is written."""
    rngs = data_parallel.gather((data_gen.get_state().cpu(), sigma_gen.get_state()))
    if data_parallel.rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({
            "model": state.world.model.state_dict(), "optimizer": optimizer.state_dict(), "ema": state.ema,
            "step": state.step, "total_steps": state.total_steps, "losses": state.losses, "seconds": state.seconds,
            "data_rng": rngs[0][0], "sigma_rng": rngs[0][1], "processes": len(rngs), "other_rngs": rngs[1:],
            "config": asdict(config),
        }, tmp)
        tmp.replace(path)
    data_parallel.barrier()
