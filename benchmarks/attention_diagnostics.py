"""Where the trained_ar world's attention goes: per layer and head, per query tile (issue 18).

    python -m benchmarks.attention_diagnostics --device cuda --weights runs/ar/hy_trained_ar.pt --out OUT
    python -m benchmarks.attention_diagnostics --smoke --out /tmp/diag        # CPU: untrained, tiny

Runs dense generation (the deployment form: chunk queries over the cached context plus the chunk)
on held-out rooms and trajectories from the true first chunk, and records the attention weights of
every self-attention call of every denoising step of every chunk after the first. Tokens are cut
into tiles of ``1 x tile_h x tile_w`` tokens (one frame each). For every query tile of the chunk
(its queries' weights averaged), and then averaged over query tiles, chunks, steps and cases:

- ``own``, ``recent``, ``memory``: the share of the attention mass on the chunk's own tokens, on
  the recent window's frames and on the memory frames retrieved by camera overlap (they sum to 1);
- ``visible``: the share on context key tiles visible from the chunk's cameras (a tile is visible
  when a point along one of its tokens' rays, at ``VISIBILITY_DEPTHS``, projects into the field of
  view of a chunk camera), with ``visible_area``, the share of the context tiles that are visible;
- ``k90``, ``k99``: the smallest share of the valid key tiles holding 90% / 99% of the mass
  (concentration: what a block-sparse plan at tile granularity must visit to keep that recall).

Writes ``OUT/attention_diagnostics.json`` (per layer and head, and per step) and
``OUT/attention_diagnostics.md`` (the table, with the command that made it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from unittest import mock

import torch

from li_compile.controller.poses import bounds_from_fov, invert_poses
from li_compile.worlds.fidelity import prefix_hook
from li_compile.worlds.layers import camera_rays
from li_compile.worlds.pipeline import DensePolicy, generate
from li_compile.worlds.pixel_codec import PixelPatchCodec
from li_compile.worlds.trained import (
    AR_WEIGHTS_PATH, PIXEL_STRIDE, TRAINED_AR_SPEC, image_size, load_trained_ar, untrained,
)
from training.fidelity import held_out_cases

SHARES = ("own", "recent", "memory", "visible", "visible_area", "k90", "k99")
VISIBILITY_DEPTHS = (1.0, 2.5, 6.0)  # scene units along a key token's ray tested against the chunk's cameras
SMOKE_SIZES = {"latent_h": 8, "latent_w": 8, "depth": 2, "heads": 2}


def tile_ids(frames: int, grid: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """Tile index of every raster token of ``frames`` frames of ``grid`` tokens: ``(frames * h * w,)``,
    tiles of ``tile = (tile_h, tile_w)`` tokens numbered frame by frame (ragged tiles at the edges)."""
    (h, w), (th, tw) = grid, tile
    per_row = -(-w // tw)
    rows = torch.arange(h)[:, None] // th * per_row + torch.arange(w)[None] // tw  # (h, w)
    per_frame = -(-h // th) * per_row
    return (torch.arange(frames)[:, None] * per_frame + rows.reshape(1, -1)).reshape(-1)


def tile_masses(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, q_tiles: torch.Tensor,
                k_tiles: torch.Tensor) -> torch.Tensor:
    """Attention mass per (head, query tile, key tile): ``q (1, H, Lq, D)``, ``k (1, H, Lk, D)``,
    ``mask`` broadcasting to ``(1, H, Lq, Lk)`` (bool: keep) -> ``(H, Qt, Kt)`` float32, each query
    tile's queries' weights averaged (rows sum to 1)."""
    scores = q[0].float() @ k[0].float().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[0], float("-inf"))
    probs = scores.softmax(-1)  # (H, Lq, Lk)
    heads = probs.shape[0]
    qt, kt = int(q_tiles.max()) + 1, int(k_tiles.max()) + 1
    by_key = torch.zeros(heads, probs.shape[1], kt, device=probs.device).index_add_(2, k_tiles.to(probs.device), probs)
    by_query = torch.zeros(heads, qt, kt, device=probs.device).index_add_(1, q_tiles.to(probs.device), by_key)
    counts = torch.bincount(q_tiles, minlength=qt).to(probs.device).float()
    return by_query / counts[None, :, None]


def visible_tiles(key_poses: torch.Tensor, chunk_poses: torch.Tensor, fov_y_deg: float, grid: tuple[int, int],
                  tiles: torch.Tensor) -> torch.Tensor:
    """Which tiles of key frames ``key_poses (K, 4, 4)`` some camera of ``chunk_poses (F, 4, 4)`` sees:
    ``(K * tiles_per_frame,)`` bool (``tiles``: ``tile_ids`` of one frame)."""
    origins, dirs = camera_rays(key_poses, fov_y_deg, grid, 1)  # (K, h * w, 3)
    depths = torch.tensor(VISIBILITY_DEPTHS)
    points = origins[..., None, :] + depths[:, None] * dirs[..., None, :]  # (K, hw, P, 3)
    to_camera = invert_poses(chunk_poses)  # (F, 4, 4)
    local = torch.einsum("fij,kmpj->fkmpi", to_camera[:, :3, :3], points) + to_camera[:, None, None, None, :3, 3]
    x_min, x_max, y_min, y_max = bounds_from_fov(fov_y_deg, grid[1] / grid[0]).tolist()
    z = local[..., 2]
    x, y = local[..., 0] / z.clamp_min(1e-6), local[..., 1] / z.clamp_min(1e-6)
    seen = ((z > 0) & (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)).any(-1).any(0)  # (K, hw)
    per_frame = int(tiles.max()) + 1
    out = torch.zeros(key_poses.shape[0], per_frame, dtype=torch.bool)
    for t in range(per_frame):
        out[:, t] = seen[:, tiles == t].any(-1)
    return out.reshape(-1)


def chunk_shares(masses: torch.Tensor, slot_kind: list[str], visible: torch.Tensor, tiles_per_frame: int) -> dict:
    """The ``SHARES`` per head of one call's ``masses (H, Qt, Kt)`` (keys: context slots then chunk
    frames), averaged over query tiles: ``slot_kind[i]`` is ``"padding"``, ``"memory"`` or ``"recent"``,
    ``visible (K * tiles_per_frame,)`` the context tiles some chunk camera sees."""
    slots = len(slot_kind)
    kind = torch.tensor([{"padding": 0, "memory": 1, "recent": 2}[k] for k in slot_kind]).repeat_interleave(tiles_per_frame)
    context = masses[..., :slots * tiles_per_frame]
    valid_context = kind > 0
    out = {
        "own": masses[..., slots * tiles_per_frame:].sum(-1),
        "recent": context[..., kind == 2].sum(-1),
        "memory": context[..., kind == 1].sum(-1),
        "visible": context[..., visible & valid_context].sum(-1),
    }
    valid = torch.cat([valid_context, torch.ones(masses.shape[-1] - slots * tiles_per_frame, dtype=torch.bool)])
    ordered = masses[..., valid].sort(-1, descending=True).values.cumsum(-1)
    for name, level in (("k90", 0.9), ("k99", 0.99)):
        out[name] = ((ordered < level).sum(-1) + 1).clamp_max(ordered.shape[-1]).float() / ordered.shape[-1]
    means = {k: v.mean(-1).cpu() for k, v in out.items()}  # over query tiles: (H,)
    area = float(visible[valid_context].float().mean()) if valid_context.any() else 0.0
    means["visible_area"] = torch.full_like(means["own"], area)
    return means


def record(world, case, codec, tile: tuple[int, int], seed: int = 0) -> list[dict]:
    """Per chunk (after the first), step and layer: ``chunk_shares`` of a dense rollout of ``case``."""
    spec = world.spec
    grid, chunk_tokens = spec.grid, spec.chunk_frames * spec.tokens_per_frame
    one_frame = tile_ids(1, grid, tile)
    per_frame = int(one_frame.max()) + 1
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls, where = [], {}

    def recording(q, k, v, attn_mask=None, **kwargs):
        frames = k.shape[-2] // spec.tokens_per_frame
        if q.shape[-2] == chunk_tokens and k.shape[-2] > chunk_tokens and k.shape[-2] % spec.tokens_per_frame == 0:
            k_tiles = tile_ids(frames, grid, tile)
            q_tiles = k_tiles[-chunk_tokens:] - (frames - spec.chunk_frames) * per_frame
            calls.append((dict(where), tile_masses(q, k, attn_mask, q_tiles, k_tiles)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    def step_hook(chunk, step, model_call):
        where.update(chunk=chunk, step=step)
        return model_call()

    prefix = codec.encode(case.frames[:spec.chunk_frames])
    hook = prefix_hook(world, prefix, seed, then=step_hook)
    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", recording):
        result = generate(world, case.trajectory, DensePolicy(spec.window, spec.memory), step_hook=hook, seed=seed,
                          decode=False)
    poses, rows, layer_of = case.trajectory.poses, [], {}
    for at, masses in calls:
        key = (at["chunk"], at["step"])
        layer_of[key] = layer = layer_of.get(key, -1) + 1
        selection = result.selections[at["chunk"]]
        slots = masses.shape[-1] // per_frame - spec.chunk_frames
        frames = selection.frames
        kind = ["padding"] * (slots - len(frames)) + ["memory"] * len(selection.memory) + ["recent"] * len(selection.recent)
        first = at["chunk"] * spec.chunk_frames
        key_poses = torch.stack([poses[f] if f >= 0 else torch.eye(4) for f in [-1] * (slots - len(frames)) + frames])
        visible = visible_tiles(key_poses, poses[first:first + spec.chunk_frames], case.trajectory.fov_y_deg, grid,
                                one_frame)
        rows.append({"chunk": at["chunk"], "step": at["step"], "layer": layer,
                     **chunk_shares(masses.cpu(), kind, visible, per_frame)})
    return rows


def summarise(rows: list[dict], heads: int) -> dict:
    """Mean of every share per (layer, head), and per (step, layer, head)."""
    def mean_of(selected):
        return {k: torch.stack([r[k] for r in selected]).mean(0).tolist() for k in SHARES}

    layers = sorted({r["layer"] for r in rows})
    steps = sorted({r["step"] for r in rows})
    return {
        "per_layer": [{"layer": l, **mean_of([r for r in rows if r["layer"] == l])} for l in layers],
        "per_step": [{"step": s, "layer": l, **mean_of([r for r in rows if r["layer"] == l and r["step"] == s])}
                     for s in steps for l in layers],
        "all": mean_of(rows),
    }


def table(summary: dict, command: str) -> str:
    """The markdown table: one row per layer and head, then the mean over them."""
    lines = [f"Command: `{command}`", "", "| layer | head | " + " | ".join(SHARES) + " |",
             "|---|---|" + "---|" * len(SHARES)]
    for row in summary["per_layer"]:
        for h in range(len(row["own"])):
            lines.append(f"| {row['layer']} | {h} | " + " | ".join(f"{row[k][h]:.3f}" for k in SHARES) + " |")
    mean = {k: sum(v) / len(v) for k, v in summary["all"].items()}
    lines.append("| all | mean | " + " | ".join(f"{mean[k]:.3f}" for k in SHARES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=AR_WEIGHTS_PATH)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=48, help="frames per held-out trajectory")
    parser.add_argument("--per-trajectory", type=int, default=1, help="held-out cases per trajectory name")
    parser.add_argument("--tile", type=int, nargs=2, default=(8, 8), metavar=("H", "W"), help="tokens per tile (one frame)")
    parser.add_argument("--smoke", action="store_true", help=f"untrained, {SMOKE_SIZES}, one short case (CPU tests)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.smoke:
        world = untrained(dataclasses.replace(TRAINED_AR_SPEC, **SMOKE_SIZES), args.device, form="cached")
        cases = held_out_cases(min(args.frames, 16), 1, image_size(world.spec), ("loop",), args.device)
    else:
        world = load_trained_ar(args.device, args.weights, form="cached")
        cases = held_out_cases(args.frames, args.per_trajectory, image_size(world.spec), None, args.device)
    codec = PixelPatchCodec(PIXEL_STRIDE)
    rows = [row for case in cases for row in record(world, case, codec, tuple(args.tile))]
    summary = summarise(rows, world.spec.heads)
    command = "python -m benchmarks.attention_diagnostics " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "spec": world.spec.name, "tokens_per_frame": world.spec.tokens_per_frame,
              "tile": list(args.tile), "cases": [f"{c.trajectory.name}/{c.scene_seed}" for c in cases], **summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_diagnostics.json").write_text(json.dumps(result, indent=2))
    (args.out / "attention_diagnostics.md").write_text(table(summary, command))
    print(table(summary, command))
    return result


if __name__ == "__main__":
    main()
