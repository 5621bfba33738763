"""What the denoising cache's key costs a chunk: the weights' once-per-chunk L2 norms
(``cache_key.weight_norms``, one fused reduction and one read) and the conditioning's digests, at a
full preset's real size (to set against a chunk: HY full 1.5-6.2 s, Matrix-Game full 0.4-1.3 s on an
H100, ``benchmarks/results/end_to_end.md``).

Builds the world's model on the device (random weights), then times, each ``--repeats`` times after
one warm call: ``weight_norms`` over every parameter and buffer, ``conditioning_digest`` over a
chunk's conditioning inputs (those not in the world's ``revisit_inputs``), each as a new chunk's first
cached call makes it. Prints milliseconds and writes them to ``--json``::

    bash benchmarks/run_on_device.sh python benchmarks/cache_key_cost.py --world hy_worldplay [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.tile_permute import wall_ms
from li_compile.cache_key import DigestMemo, conditioning_digest, weight_norms
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.pipeline import ContextSelection, gather_context

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="hy_worldplay")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    world = WORLDS[args.world].build(args.preset, device=args.device)
    weights = [*world.model.parameters(), *world.model.buffers()]
    spec = world.spec
    path = trajectories.make("loop", spec.context_frames + spec.chunk_frames)
    history = torch.randn(spec.context_frames, *spec.latent_shape)
    selection = ContextSelection(memory=[], recent=list(range(spec.context_frames)), capacity=spec.context_frames)
    context = gather_context(history, path.poses[:spec.context_frames], selection, spec.context_frames)
    inputs = world.inputs(context, path.poses[spec.context_frames:], path.actions()[spec.context_frames:],
                          spec.context_frames)
    conditioning = [v for k, v in inputs.items() if k not in world.revisit_inputs and isinstance(v, torch.Tensor)]
    epochs = iter(range(1, 1 << 30))
    memo = DigestMemo()
    row = {
        "world": f"{args.world}/{args.preset}", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "weights": len(weights), "weight_gb": sum(t.numel() * t.element_size() for t in weights) / 1e9,
        "conditioning": [list(t.shape) for t in conditioning],
        "weight_norms_ms": wall_ms(lambda: weight_norms(weights), args.repeats),
        "conditioning_digest_ms": wall_ms(lambda: conditioning_digest(memo, conditioning, next(epochs)), args.repeats),
    }
    for key in ("weight_norms_ms", "conditioning_digest_ms"):
        print(f"{key}: median {sorted(row[key])[len(row[key]) // 2]:.2f} ms over {args.repeats}")
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_ms")}))
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
