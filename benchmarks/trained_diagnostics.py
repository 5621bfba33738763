"""Where the trained world's distance to the truth comes from: sampler or model? (CPU, a few minutes)

    python -m benchmarks.trained_diagnostics --json out/trained_diagnostics.json

Five probes (``--probes``), scored by PSNR against the renderer's ground truth (held-out rooms):

- **steps**: dense rollouts with 1, 2 and 4 Euler steps, and with 4 steps at timestep shifts 1, 3,
  7 (the preset's) and 15. One step from pure noise returns the model's mean prediction (the
  PSNR-optimal guess); if more steps score far better, the sampler is at fault, if they score alike
  (or worse), the model is.
- **context** (the first generated chunk, one step): with the true context, with only the last
  given frame, and with the first chunk of a *different* room. The gap between the true and the
  wrong room says how much the model reads its context; "repeat last" is what copying the last
  given frame would score.
- **drift** (the preset's sampler): PSNR of each generated chunk in the rollout (context: the
  model's own frames) against the same chunk generated from the true history (teacher forced:
  every earlier chunk is the truth, ``prefix_hook``), and repeat-last. The gap between the two is
  what generating from its own frames costs.
- **copy** (one step, teacher forced, no context noise): chunks of rendered clips whose memory slots
  hold the chunk's own frames at its own cameras (``sample_batch(..., revisit_fraction=1)``), so
  copying memory would be exact, against the same chunks with ``DensePolicy``'s memory. A model
  that brings a remembered view back scores far above the second number.
- **attention** (the copy probe's first batch, ``sigma = 1``): per block, the mean over chunk
  queries of their largest self-attention weight. Copying one token per query needs it near 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from unittest import mock

import torch

from li_compile.worlds.fidelity import prefix_hook
from training.fidelity import add_case_arguments, rollout, trained_world_and_cases
from li_compile.worlds.report_tools import frame_psnr, repeat_last
from training import data as training_data
from li_compile.worlds.pipeline import DensePolicy, generate
from li_compile.worlds.sampling import euler_step
from training.data import make_pool, sample_batch

PROBES = ("steps", "context", "copy", "attention", "drift")
STEPS = (1, 2, 4)
SHIFTS = (1.0, 3.0, 7.0, 15.0)  # timestep shifts of the 4-step sampler (the preset's: 7)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@contextlib.contextmanager
def sampler_settings(world, **settings):
    """Within the block, the world samples with ``settings`` (``steps``, ``shift``) in place of its preset's."""
    preset = world.spec
    world.spec = dataclasses.replace(preset, **settings)
    try:
        yield
    finally:
        world.spec = preset


def dense_score(world, codec, cases, **sampler) -> float:
    """Mean PSNR of whole dense rollouts (frames after the given chunk) with the sampler settings
    ``sampler`` (``steps``, ``shift``) in place of the preset's."""
    f, spec = world.spec.chunk_frames, world.spec
    with sampler_settings(world, **sampler):
        return mean([frame_psnr(rollout(world, codec, c, DensePolicy(spec.window, spec.memory))[f:], c.frames[f:])
                     for c in cases])


def steps_probe(world, codec, cases) -> dict[str, float]:
    """Dense rollout PSNR with each number of steps, and with each timestep shift at the preset's steps."""
    f, spec = world.spec.chunk_frames, world.spec
    settings = {f"dense_{steps}_steps": (steps, spec.shift) for steps in STEPS}
    settings |= {f"dense_shift_{shift:g}": (spec.steps, shift) for shift in SHIFTS}
    scores = {pair: dense_score(world, codec, cases, steps=pair[0], shift=pair[1]) for pair in set(settings.values())}
    result = {key: scores[pair] for key, pair in settings.items()}  # the preset's sampler is run once, not twice
    result["repeat_last"] = mean([frame_psnr(repeat_last(c.frames, f), c.frames[f:]) for c in cases])
    return result


def context_probe(world, codec, cases) -> dict[str, float]:
    """PSNR of the first generated chunk (one step: the mean prediction) under three contexts."""
    f, spec = world.spec.chunk_frames, world.spec
    chunk = slice(f, 2 * f)
    two_chunks = [dataclasses.replace(c, frames=c.frames[:2 * f]) for c in cases]

    def score(policy, swap: bool) -> float:
        values = []
        for i, case in enumerate(two_chunks):
            given = two_chunks[(i + 1) % len(two_chunks)] if swap else case
            probe = dataclasses.replace(case, frames=torch.cat([given.frames[:f], case.frames[f:]]))
            values.append(frame_psnr(rollout(world, codec, probe, policy)[chunk], case.frames[chunk]))
        return mean(values)

    with sampler_settings(world, steps=1):
        return {
            "true_context": score(DensePolicy(spec.window, spec.memory), swap=False),
            "last_frame_only": score(DensePolicy(1, 0), swap=False),
            "other_room_context": score(DensePolicy(spec.window, spec.memory), swap=True),
            "repeat_last": mean([frame_psnr(repeat_last(c.frames, f, 2 * f), c.frames[chunk]) for c in two_chunks]),
        }


def drift_probe(world, codec, cases) -> dict[str, list[float] | float]:
    """Per generated chunk (1, 2, ...), mean PSNR over the cases: rollout, teacher forced, repeat-last."""
    f, spec = world.spec.chunk_frames, world.spec
    chunks = min(len(c.frames) for c in cases) // f
    policy = DensePolicy(spec.window, spec.memory)
    rows = {"rollout": [], "teacher_forced": [], "repeat_last": []}
    for case in cases:
        truth, latents = case.frames, codec.encode(case.frames)
        dense = rollout(world, codec, case, policy)
        repeat = repeat_last(truth, f, chunks * f)
        scores = {"rollout": [], "teacher_forced": [], "repeat_last": []}
        for c in range(1, chunks):
            frames = slice(c * f, (c + 1) * f)
            forced = generate(world, case.trajectory, policy, c + 1, step_hook=prefix_hook(world, latents[:c * f], 0),
                              decode=False)
            scores["rollout"].append(frame_psnr(dense[frames], truth[frames]))
            scores["teacher_forced"].append(frame_psnr(codec.decode(forced.latents[frames]), truth[frames]))
            scores["repeat_last"].append(frame_psnr(repeat[(c - 1) * f:c * f], truth[frames]))
        for key, values in scores.items():
            rows[key].append(values)
    per_chunk = {key: [mean(list(column)) for column in zip(*values)] for key, values in rows.items()}
    return per_chunk | {f"{key}_mean": mean(values) for key, values in per_chunk.items()}


COPY_CLIPS, COPY_SEED = 16, 5  # the copy probe's clips (rendered rooms; training draws seed 0) and seed


def _copy_batches(world, codec) -> list[tuple[str, dict, torch.Tensor, torch.Tensor]]:
    """``(name, inputs, target, noise)`` of the copy probe's two batches (no context noise or memory
    dropout): memory slots holding the chunk's own frames, then ``DensePolicy``'s memory."""
    spec = world.spec
    pool = make_pool(COPY_CLIPS, 8 * spec.chunk_frames, spec, COPY_SEED, world.device, codec.stride * spec.latent_h)
    batches = []
    with mock.patch.multiple(training_data, CONTEXT_NOISE=0.0, MEMORY_DROPOUT=0.0):
        for name, fraction in (("memory_is_the_chunk", 1.0), ("dense_policy_memory", 0.0)):
            batch = sample_batch(pool, COPY_CLIPS, spec, codec, torch.Generator(world.device).manual_seed(0),
                                 revisit_fraction=fraction)
            target = batch.pop("target")
            noise = torch.randn(target.shape, generator=torch.Generator(world.device).manual_seed(1),
                                device=target.device)
            batches.append((name, {**batch, "text": world.text.expand(len(target), -1, -1)}, target, noise))
    return batches


def copy_probe(world, codec) -> dict[str, float]:
    """One-step PSNR of the clean chunk when memory holds the chunk itself, and with the usual memory."""
    scores = {}
    for name, inputs, target, noise in _copy_batches(world, codec):
        velocity = world.model(noise, torch.tensor(1.0, device=target.device), **inputs)
        clean = euler_step(noise, velocity, 1.0, 0.0)
        scores[name] = frame_psnr(codec.decode(clean).flatten(0, 1), codec.decode(target).flatten(0, 1))
    return scores


def attention_probe(world, codec) -> list[float]:
    """Per block, the mean over chunk queries of their largest self-attention weight, on the copy
    probe's first batch (memory: the chunk itself) at ``sigma = 1``: how sharply the network
    attends where copying one token per query would be exact (1.0: all weight on one key)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    chunk_queries = world.spec.chunk_frames * world.spec.tokens_per_frame
    sharpest = []

    def recording(q, k, v, attn_mask=None, **kwargs):
        if k.shape[-2] > world.spec.text_tokens:  # self-attention (the prompt's cross-attention has few keys)
            scores = q[..., -chunk_queries:, :].float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            sharpest.append(scores.softmax(-1).amax(-1).mean().item())
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    name, inputs, target, noise = _copy_batches(world, codec)[0]
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", recording):
        world.model(noise, torch.tensor(1.0, device=target.device), **inputs)
    return sharpest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_arguments(parser, per_trajectory=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated subset of {','.join(PROBES)}")
    args = parser.parse_args()
    probes = args.probes.split(",")
    if not set(probes) <= set(PROBES):
        parser.error(f"--probes must name some of {', '.join(PROBES)}, got {args.probes!r}")
    world, codec, cases = trained_world_and_cases(args)
    result = {"cases": [f"{c.trajectory.name}/{c.scene_seed}" for c in cases], "frames": args.frames}
    with torch.no_grad():
        if "steps" in probes:
            result["steps"] = steps_probe(world, codec, cases)
            print("steps:", {k: round(v, 2) for k, v in result["steps"].items()}, flush=True)
        if "context" in probes:
            result["context"] = context_probe(world, codec, cases)
            print("context (first generated chunk, 1 step):", {k: round(v, 2) for k, v in result["context"].items()})
        if "copy" in probes:
            result["copy"] = copy_probe(world, codec)
            print("copy (one step; memory: the chunk itself, the usual):",
                  {k: round(v, 2) for k, v in result["copy"].items()}, flush=True)
        if "attention" in probes:
            result["attention"] = attention_probe(world, codec)
            print("attention (per block, mean largest weight of a chunk query; memory: the chunk itself):",
                  [round(v, 3) for v in result["attention"]], flush=True)
        if "drift" in probes:
            result["drift"] = drift = drift_probe(world, codec, cases)
            columns = ("rollout", "teacher_forced", "repeat_last")
            print("drift (per generated chunk: rollout / teacher forced / repeat last):")
            for c, row in enumerate(zip(*(drift[k] for k in columns)), 1):
                print(f"  chunk {c:2d}: " + " / ".join(f"{v:.2f}" for v in row))
            print("  mean    : " + " / ".join(f"{drift[k + '_mean']:.2f}" for k in columns))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
