"""What a camera tile plan costs on the host and how dense it comes out, at the full presets' shapes.

For each world's ``full`` preset (full context, no padding), along one trajectory, it builds the
chunk's tile plan (``controller.attention_plan.write_tile_chunk_plan``) for a few chunks, written
into a plan slot of the preset's heads, and prints the time per plan, the plan density (visited
block pairs) and the share the block-sparse kernel would run outside the flash span (against
``sparsity.max_density``), for ``recent_radius`` 1 (default) and 0, and for a full-sequence world
under each context-row rule (``sparsity.context_queries``).

    python benchmarks/tile_plan_cost.py [--trajectory random_walk_with_returns] [--chunks 4]
"""

from __future__ import annotations

import argparse
import itertools
import time

from li_compile.controller.attention_plan import kernel_density, tile_shape, write_tile_chunk_plan
from li_compile.controller.poses import bounds_from_fov
from li_compile.controller.tile_plan import TilePlanParams
from li_compile.options import CONTEXT_QUERY_RULES, SparsityOptions
from li_compile.plan import Plan, SlotSignature
from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence
from li_compile.worlds import hy_worldplay, matrix_game3, trajectories

FORMS = {"hy_worldplay": (hy_worldplay, "all"), "matrix_game3": (matrix_game3, "all"),
         "matrix_game3_cached": (matrix_game3, "chunk")}  # (module, queries): Matrix-Game in both of its forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectory", default="random_walk_with_returns", choices=sorted(trajectories.TRAJECTORIES))
    parser.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args()
    for name, (module, queries) in FORMS.items():
        spec = module.PRESETS["full"]
        grid_h, grid_w = spec.grid
        context = spec.context_frames
        sequence = SequenceLayout(context, spec.chunk_frames, grid_h, grid_w, queries=queries)
        tiled = TiledSequence(sequence, tile_shape(128))  # made once per capacity, as the controller does
        plan = Plan()
        plan_slot = plan.slot_for(SlotSignature(1, spec.heads, sequence.q_len, sequence.kv_len, "cpu", 128, 128))
        frames = context + args.chunks * spec.chunk_frames
        trajectory = trajectories.make(args.trajectory, frames, chunk_frames=spec.chunk_frames)
        roles = ["memory"] * spec.memory + ["recent"] * (context - spec.memory)
        bounds = bounds_from_fov(trajectory.fov_y_deg, trajectory.aspect)
        rules = CONTEXT_QUERY_RULES if queries == "all" else (SparsityOptions().context_queries,)
        for radius, rule in itertools.product((1, 0), rules):
            times, densities, kernel = [], [], []
            for c in range(args.chunks):
                first = context + c * spec.chunk_frames
                start = time.perf_counter()
                stats = write_tile_chunk_plan(
                    plan, tiled, roles, trajectory.poses[first - context:first],
                    trajectory.poses[first:first + spec.chunk_frames], bounds,
                    TilePlanParams(recent_radius=radius, context_queries=rule), SparsityOptions(max_density=1.0),
                )
                times.append(time.perf_counter() - start)
                densities.append(stats["plan_density"])
                kernel.append(kernel_density(stats["plan_density"], plan_slot.dense_span, plan_slot.signature.kv_blocks))
            print(f"{name} (q {sequence.q_len}, k {sequence.kv_len}) {args.trajectory} recent_radius {radius}, "
                  f"context rows {rule if queries == 'all' else '-'}: {1000 * sum(times) / len(times):.0f} ms per plan, "
                  f"density {min(densities):.2f}-{max(densities):.2f}, kernel {min(kernel):.2f}-{max(kernel):.2f}")


if __name__ == "__main__":
    main()
