"""What reusing the context rows across a chunk's denoising steps would cost in fidelity (eager, CPU).

HY-WorldPlay's full sequence runs the context frames' tokens through every block at every step,
though only the chunk's rows feed the sampler. Computing the context rows at some steps only (the
first among them), and letting the other steps' chunk rows attend to the last such step's context
keys and values, saves most of those steps' attention. For a block-causal model (the context never
attends to the chunk) it changes nothing: that is the KV-cache form. For a bidirectional one it is
an approximation: the context's keys and values at depth saw the chunk at a noisier step. The
backend's ``context.reuse_rows`` is the setting ``0,LAST`` (first and last step).

This script emulates each setting on the eager model with forward hooks, without the backend: at
the other steps, every block's output rows of the context are overwritten with that block's output
at the last computing step, so every later block reads that step's context keys and values. It
scores each run against the plain dense run and against the renderer's truth::

    PYTHONPATH=. python benchmarks/context_reuse_fidelity.py --preset trained --chunks 24 --full-steps 0 0,3 0,2 \\
        --trajectories random_walk_with_returns loop out_and_back wander --out benchmarks/results/context_reuse_emulation.json

``--preset trained_ar`` (block-causal, full form) is the check of the emulation: it must equal dense.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from li_compile.worlds import hy_worldplay, trajectories
from li_compile.worlds.base import MethodModule
from li_compile.worlds.fidelity import prefix_hook, trained_truth
from li_compile.worlds.pipeline import generate
from li_compile.worlds.report_tools import frame_psnr, psnr


class ContextReuse:
    """Forward hooks on ``model``'s blocks that compute the context rows only at ``full_steps`` of
    each chunk (step 0 among them; None: at every step, the plain model): other steps reuse the last
    such step's context rows.

    ``step_hook`` (for ``generate``) tells the hooks the step; ``context.shape[1]`` slots of
    ``tokens_per_frame`` tokens each lead the sequence (``HYWorldPlayDiT.forward``,
    ``MatrixGame3DiT.forward_full``). ``model``: the DiT, or a ``MethodModule`` of it (its blocks are the DiT's)."""

    def __init__(self, model: torch.nn.Module, tokens_per_frame: int, full_steps: tuple[int, ...] | None) -> None:
        self.step, self.rows, self.full_steps = 0, 0, full_steps
        self.saved: dict[int, torch.Tensor] = {}
        self.tokens_per_frame = tokens_per_frame
        model.register_forward_pre_hook(self._slots, with_kwargs=True)
        dit = model.module if isinstance(model, MethodModule) else model
        for i, block in enumerate(dit.blocks):
            block.register_forward_hook(self._block(i))

    def _slots(self, module, args, kwargs):
        self.rows = kwargs["context"].shape[1] * self.tokens_per_frame

    def _block(self, index: int):
        def hook(module, args, output):
            if self.full_steps is None:
                return output
            h, k, v = output
            if self.step in self.full_steps:
                self.saved[index] = h[:, :self.rows].clone()
                return output
            h = h.clone()
            h[:, :self.rows] = self.saved[index]
            return h, k, v
        return hook

    def step_hook(self, then):
        def hook(chunk: int, step: int, model_call):
            self.step = step
            return then(chunk, step, model_call)
        return hook


def run(preset: str, trajectory: trajectories.Trajectory, chunks: int, seed: int, full_steps: tuple[int, ...] | None):
    """One eager generation of ``preset`` (full form) from the true first chunk, the context rows
    computed at ``full_steps`` only (``ContextReuse``)."""
    world = hy_worldplay.build(preset, form="full")
    truth, prefix = trained_truth(world, trajectory, seed)
    hooks = ContextReuse(world.model, world.spec.tokens_per_frame, full_steps)
    gen = generate(world, trajectory, None, chunks, step_hook=hooks.step_hook(prefix_hook(world, prefix, seed)), seed=seed)
    return gen, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="trained", choices=("trained", "trained_ar"))
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trajectories", nargs="+", default=["random_walk_with_returns"])
    parser.add_argument("--full-steps", nargs="+", default=["0", "0,3"],
                        help="settings to score, each the comma-separated steps that compute the context rows "
                             "(step 0 among them); the other steps reuse them")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = []
    for text in args.full_steps:
        try:
            steps = tuple(sorted({int(step) for step in text.split(",")}))
        except ValueError:
            parser.error(f"--full-steps takes comma-separated step numbers, got {text!r}")
        if 0 not in steps:
            parser.error(f"every --full-steps setting must include step 0, got {text!r}")
        settings.append(steps)
    torch.manual_seed(0)
    rows = []
    spec = hy_worldplay.build(args.preset, form="full").spec
    for name in args.trajectories:
        trajectory = trajectories.make(name, args.chunks * spec.chunk_frames, seed=args.seed, chunk_frames=spec.chunk_frames)
        dense, truth = run(args.preset, trajectory, args.chunks, args.seed, None)
        given = dense.chunk(0).stop
        frames = slice(given, len(dense.frames))
        for full_steps in settings:
            reused, _ = run(args.preset, trajectory, args.chunks, args.seed, full_steps)
            per_frame = [psnr(a, b) for a, b in zip(reused.frames[frames], dense.frames[frames])]
            row = {
                "preset": args.preset, "full_steps": list(full_steps), "trajectory": name, "chunks": args.chunks,
                "seed": args.seed, "psnr_db_vs_dense": sum(per_frame) / len(per_frame),
                "min_frame_psnr_db": min(per_frame),
                "psnr_db_dense_vs_truth": frame_psnr(dense.frames[frames], truth[frames]),
                "psnr_db_reuse_vs_truth": frame_psnr(reused.frames[frames], truth[frames]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
