"""Train a trained preset of the HY-WorldPlay-style world (``trained``, ``trained_ar``) on rendered rooms.

Run from the repository root (``training`` is a folder of the repository, not installed):

    python -m training.train_world --device cuda --time-budget 530 --out runs/trained   # the shipped weights' command (2 at once, 1 H200)
    python -m training.train_world --device cuda --time-budget 900 --out runs/long      # 15 minutes, one GPU
    python -m training.train_world --device cuda --steps 3122 --out runs/repro          # the shipped weights' schedule
    python -m training.train_world --steps 3 --clips 8 --batch 4 --out /tmp/smoke   # CPU smoke run
    torchrun --nproc-per-node 4 -m training.train_world --device cuda --time-budget 900 --out runs/dp4  # 4 GPUs
    python -m training.train_world --device cuda --init li_compile/worlds/weights/hy_trained.pt \
        --rollout-fraction 0.5 --lr 2e-4 --warmup 50 --ema 0.995 --time-budget 500 --out runs/sf  # self-forcing stage
    bash training/run_trained_ar.sh   # trained_ar: its exact command (training, fidelity, attention diagnostics)

Renders a pool of clips (procedural rooms x camera trajectories with revisits), trains the DiT by
flow matching with a progress bar, checkpoints every ``--checkpoint-every`` steps to
``OUT/checkpoint.pt`` (run the same command again to resume), then writes the EMA weights
(``--weights``, default ``OUT/hy_trained.pt`` or ``OUT/hy_trained_ar.pt``, also written at every
checkpoint; the package ships them in ``li_compile/worlds/weights/`` with their SHA-256) and the loss curve ``OUT/loss.png``. The seed
fixes everything: the same command reproduces the same weights up to GPU nondeterminism.
Under ``torchrun`` each process trains on its own batches of ``--batch`` and torch's
``DistributedDataParallel`` averages the gradients (``training.recipe.train``): the global batch is ``--batch`` times the processes;
process 0 prints, checkpoints and writes the weights; resume with as many processes.
``--rollout-fraction`` trains that share of each batch on context the world generated itself
(self-forcing; ``--init`` starts from given weights): see ``training.recipe``. Measured
and off by default (``benchmarks/results/trained_world.md``): ``--camera-rays`` and
``--revisit-fraction``. On by default, as the shipped weights were trained: ``--qk-gain 2`` (sharper
attention at the start), ``--prope-unit 4`` (camera-relative attention; 0 turns it off) and, on
CUDA, ``--compile`` (``torch.compile``: 2.6x the steps per second of eager on an H200 with PRoPE,
``benchmarks/training_speed.py``, after about a minute and a half of compiling).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from training import data_parallel  # noqa: E402
from li_compile.worlds.base import OUTPUTS  # noqa: E402
from li_compile.worlds.hy_worldplay import TRAINED, TRAINED_AR  # noqa: E402
from li_compile.worlds.trained import (  # noqa: E402
    AR_WEIGHTS_PATH, TRAINED_AR_SPEC, TRAINED_SPEC, WEIGHTS_PATH, image_size, sha256_of,
)
from training.recipe import TrainConfig, averaged_weights, export_weights, train  # noqa: E402
from training.data import make_pool  # noqa: E402
from li_compile.worlds.trajectories import FOV_Y_DEG  # noqa: E402

SMOOTHING = 50  # steps averaged in the plotted loss curve
PRESETS = {TRAINED: (TRAINED_SPEC, WEIGHTS_PATH.name), TRAINED_AR: (TRAINED_AR_SPEC, AR_WEIGHTS_PATH.name)}
SMOKE_SIZES = {"latent_h": 4, "latent_w": 4, "depth": 1, "heads": 2}  # --smoke: a world the CPU trains in seconds


def plot_losses(losses: list[float], path: Path) -> None:
    """Per-step loss (faint) and its running mean over ``SMOOTHING`` steps, log scale."""
    steps = torch.arange(1, len(losses) + 1)
    values = torch.tensor(losses)
    kernel = min(SMOOTHING, len(losses))
    smooth = torch.nn.functional.avg_pool1d(values[None, None], kernel, stride=1)[0, 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, alpha=0.25, lw=0.5, label="step")
    ax.plot(steps[kernel - 1:], smooth, lw=1.5, label=f"mean of {kernel}")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="trained world: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def unit_or_off(text: str) -> float | None:
    """``--prope-unit``'s value: a length in scene units, or 0 for no camera-relative attention."""
    value = float(text)
    return None if value == 0 else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = None if f.name == "compile" else getattr(defaults, f.name)  # None: on for CUDA
        boolean = isinstance(getattr(defaults, f.name), bool)
        kind = {"action": argparse.BooleanOptionalAction} if boolean else {"type": type(default)}
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=default, **kind)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=TRAINED)
    parser.add_argument("--smoke", action="store_true",
                        help=f"shrink the preset's world to {SMOKE_SIZES} (CPU smoke runs of the whole script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/trained"))
    parser.add_argument("--weights", type=Path, default=None, help="where to write the EMA weights")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="fit pool rendering and training into about this many seconds (see train())")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--output", choices=OUTPUTS, default=TRAINED_SPEC.output,
                        help="what the network predicts (WorldSpec.output; 'velocity' is the ablation)")
    parser.add_argument("--camera-rays", action=argparse.BooleanOptionalAction,
                        default=TRAINED_SPEC.ray_fov_deg is not None,
                        help="embed every token's camera rays (WorldSpec.ray_fov_deg; measured, not shipped)")
    parser.add_argument("--prope-unit", type=unit_or_off, default=TRAINED_SPEC.prope_unit,
                        help="camera-relative attention (WorldSpec.prope_unit): translations in these scene "
                             "lengths; 0 turns it off")
    parser.add_argument("--heads", type=int, default=None,
                        help=f"attention heads of {TRAINED_SPEC.head_dim} dims (the model's width; default: the preset's)")
    args = parser.parse_args()
    if args.compile is None:  # compiling pays on the GPU (2.6x, benchmarks/training_speed.py), not in a CPU smoke run
        args.compile = args.device.startswith("cuda")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one process per device
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    lead = data_parallel.rank() == 0
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "checkpoint.pt"
    if args.fresh and checkpoint.exists() and lead:
        checkpoint.unlink()
    data_parallel.barrier()  # nobody reads the checkpoint before the lead has removed it
    torch.backends.cuda.matmul.allow_tf32 = True

    start = time.perf_counter()
    preset_spec, weights_name = PRESETS[args.preset]
    spec = replace(preset_spec, output=args.output, heads=args.heads or preset_spec.heads,
                   ray_fov_deg=FOV_Y_DEG if args.camera_rays else None, prope_unit=args.prope_unit)
    if args.smoke:
        spec = replace(spec, **SMOKE_SIZES)
    args.heads = spec.heads
    size = image_size(spec)
    weights = args.weights or args.out / weights_name
    pool = make_pool(config.clips, config.clip_frames, spec, config.seed, args.device, size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    pool_s = time.perf_counter() - start
    frames = config.clips * config.clip_frames
    if lead:
        print(f"rendered {frames} frames of {size}x{size} in {pool_s:.1f} s ({frames / pool_s:.0f} "
              "frames/s, scene building and context selection included)", flush=True)
    budget = None if args.time_budget is None else args.time_budget - pool_s
    bar = tqdm(total=config.steps, desc="training", unit="step", disable=not lead)

    def on_step(state) -> None:
        bar.total = state.total_steps
        bar.n = state.step
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}", refresh=False)
        bar.update(0)
        if lead and state.step % config.checkpoint_every == 0:  # a crash later loses no weights
            export_weights(averaged_weights(state, config.ema), weights)

    state = train(config, args.device, checkpoint, budget, on_step, pool=pool, spec=spec)
    bar.close()
    processes = data_parallel.world_size()
    if processes > 1:
        dist.destroy_process_group()
    if not lead:  # the weights are the same in every process: the lead writes them
        return
    export_weights(averaged_weights(state, config.ema), weights)
    plot_losses(state.losses, args.out / "loss.png")
    tail = state.losses[-SMOOTHING:]
    summary = {"steps": state.step, "total_steps": state.total_steps, "seconds": round(state.seconds, 1),
               "pool_seconds": round(pool_s, 1), "frames_rendered": frames, "final_loss": sum(tail) / len(tail),
               "weights": str(weights), "sha256": sha256_of(weights), "preset": args.preset,
               "smoke": args.smoke, "spec": {k: str(v) for k, v in asdict(spec).items()}, "output": args.output, "heads": args.heads,
               "camera_rays": args.camera_rays, "prope_unit": args.prope_unit, "processes": processes,
               "global_batch": config.batch * processes, "config": asdict(config)}
    (args.out / "train.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


if __name__ == "__main__":
    main()
