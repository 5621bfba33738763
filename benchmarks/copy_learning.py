"""How fast can the trained world's network learn to copy a remembered view? (CPU, minutes)

    python -m benchmarks.copy_learning --steps 1500 --camera-rays [--prope-unit 4] --json out/copy.json

The trained world scores about 19 dB where memory holds the exact view the camera sees
(``trained_diagnostics.py --probes copy``), so it does not bring a remembered place back token by
token. This trains a small network of the same code path (2 blocks of width 128, 16x16 frames:
4 tokens per frame) with ``revisit_fraction`` of its examples exact revisits, and scores the copy
probe (``trained_diagnostics.copy_probe``) as the steps go by: whether, and how fast, copying is
learned at all, with and without camera rays.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.trained import PIXEL_STRIDE, TRAINED_SPEC
from training.recipe import TrainConfig, averaged_weights, train
from training.data import make_pool
from li_compile.worlds.trajectories import FOV_Y_DEG
from benchmarks.trained_diagnostics import copy_probe

IMAGE = 16  # frames of 16x16 pixels: 4x4 latents, 2x2 tokens
CLIPS, CLIP_FRAMES = 256, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--camera-rays", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--revisit-fraction", type=float, default=0.5)
    parser.add_argument("--prope-unit", type=float, default=None,
                        help="camera-relative attention (WorldSpec.prope_unit): translations in these scene lengths")
    parser.add_argument("--heads", type=int, default=4, help="heads of 32 dims (width = 32 x heads)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    latent = IMAGE // PIXEL_STRIDE
    spec = replace(TRAINED_SPEC, name="trained/copy", latent_h=latent, latent_w=latent, depth=2, heads=args.heads,
                   ray_fov_deg=FOV_Y_DEG if args.camera_rays else None, prope_unit=args.prope_unit)
    config = TrainConfig(steps=args.steps, batch=32, sigma_groups=2, lr=1e-3, warmup=50, ema=0.99, clips=CLIPS,
                         clip_frames=CLIP_FRAMES, revisit_fraction=args.revisit_fraction)
    pool = make_pool(CLIPS, CLIP_FRAMES, spec, config.seed, "cpu", IMAGE)
    state = train(config, "cpu", pool=pool, spec=spec)
    world = state.world
    world.model.load_state_dict(averaged_weights(state, config.ema))
    world.model.eval()
    with torch.no_grad():
        scores = copy_probe(world, PixelPatchCodec(PIXEL_STRIDE))
    result = {"steps": args.steps, "camera_rays": args.camera_rays, "revisit_fraction": args.revisit_fraction,
              "prope_unit": args.prope_unit, "heads": args.heads,
              "seconds": round(state.seconds, 1), "final_loss": sum(state.losses[-50:]) / len(state.losses[-50:]),
              **scores}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
