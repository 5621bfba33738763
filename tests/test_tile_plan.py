"""Tile plans from the cameras: what every query tile visits (own chunk, sinks, the camera-shifted
recent window, visible memory), that it is written in place at a fixed capacity, and that a capacity
cut drops the lowest priorities first. The dense mask agrees with a brute-force construction."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.controller.poses import bounds_from_fov, make_poses, random_poses, rotation_about_axis
from li_compile.controller.similarity import in_frustum
from li_compile.controller.tile_plan import (
    NEVER,
    RECENT,
    SINK,
    TilePlanParams,
    block_priorities,
    empty_tile_plan,
    key_keep,
    memory_visibility,
    recent_window,
    required_capacity,
    tile_plan,
    tile_priorities,
    write_priorities_,
    write_tile_plan,
)
from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence

BOUNDS = bounds_from_fov(60.0, 2.0)
EYE = torch.eye(4)


def _tiled(queries="chunk", context=4, chunk=2, grid=(8, 16), tile=(2, 4, 4), prefix=5, suffix=0, sinks="end"):
    return TiledSequence(SequenceLayout(context, chunk, *grid, prefix, suffix, queries), tile, sinks)


def _yaw(deg: float, center=(0.0, 0.0, 0.0)) -> torch.Tensor:
    rot = rotation_about_axis(torch.tensor([0.0, 1.0, 0.0]), torch.tensor(math.radians(deg)))
    return make_poses(rot, torch.tensor(center))


def _chunk_block_rows(tiled, block_q):
    """Query blocks holding chunk tokens."""
    ids = tiled.query_tile_ids
    chunk = ids >= (tiled.context_tiles if tiled.sequence.queries == "all" else 0)
    return torch.unique(torch.nonzero(chunk).flatten() // block_q)


@st.composite
def chunks(draw):
    tile = (draw(st.integers(1, 2)), draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4])))
    tiled = TiledSequence(
        SequenceLayout(
            tile[0] * draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 9)), draw(st.integers(2, 9)),
            draw(st.integers(0, 4)), draw(st.integers(0, 2)), draw(st.sampled_from(["all", "chunk"])),
        ),
        tile, draw(st.sampled_from(["end", "in_place"])),
    )
    s = tiled.sequence
    roles = draw(st.lists(st.sampled_from(["pad", "memory", "recent"]), min_size=s.context_frames, max_size=s.context_frames))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    poses = random_poses(s.frames, 1.0, g)
    params = TilePlanParams(
        recent_radius=draw(st.integers(0, 2)), context_queries=draw(st.sampled_from(["dense", "camera", "frame_local"]))
    )
    block = draw(st.sampled_from([8, 16, 32]))
    return tiled, roles, poses[: s.context_frames], poses[s.context_frames :], params, block


@settings(max_examples=40, deadline=None)
@given(case=chunks())
def test_own_chunk_and_sinks_are_always_visited_and_padding_never(case):
    tiled, roles, context, chunk, params, block = case
    s = tiled.sequence
    layout = tile_plan(tiled, roles, context, chunk, BOUNDS, params, block_q=block, block_k=block)
    mask = layout.to_dense_mask()[0, 0]  # (q_len, kv_len) in tile order
    frames, q_tiles = tiled.key_frame_ids, tiled.query_tile_ids
    chunk_rows = q_tiles >= (tiled.context_tiles if s.queries == "all" else 0)
    assert mask[chunk_rows][:, frames >= s.context_frames].all()  # own chunk
    if s.queries == "all" and params.context_queries != "frame_local":  # context rows of real frames see the chunk
        q_frames = tiled.key_frame_ids
        real = torch.tensor([r != "pad" for r in roles] + [True] * s.chunk_frames)
        context_rows = (q_frames >= 0) & (q_frames < s.context_frames) & real[q_frames.clamp_min(0)]
        assert mask[context_rows][:, frames >= s.context_frames].all()
    assert mask[:, frames < 0].all()  # sinks, from every query
    pad = torch.tensor([r == "pad" for r in roles] + [False] * s.chunk_frames)
    assert not mask[:, (frames >= 0) & pad[frames.clamp_min(0)]].any()  # padding never


@settings(max_examples=40, deadline=None)
@given(case=chunks())
def test_dense_mask_agrees_with_a_brute_force_construction_from_the_tile_rules(case):
    tiled, roles, context, chunk, params, block = case
    s = tiled.sequence
    layout = tile_plan(tiled, roles, context, chunk, BOUNDS, params, block_q=block, block_k=block)
    prio = tile_priorities(tiled, roles, context, chunk, BOUNDS, params)
    q_groups = torch.where(tiled.query_tile_ids < 0, prio.shape[0] - 1, tiled.query_tile_ids)
    k_groups = torch.where(tiled.key_tile_ids < 0, prio.shape[1] - 1, tiled.key_tile_ids)
    keep = key_keep(tiled, roles)
    reference = torch.zeros(s.q_len, s.kv_len, dtype=torch.bool)
    for i in range(0, s.q_len, block):
        for j in range(0, s.kv_len, block):
            tiles_q, tiles_k = q_groups[i : i + block].unique(), k_groups[j : j + block].unique()
            if (prio[tiles_q][:, tiles_k] > NEVER).any():
                reference[i : i + block, j : j + block] = True
    assert torch.equal(layout.to_dense_mask()[0, 0], reference & keep[None])


def test_a_memory_frame_seen_from_the_same_pose_is_fully_visited_and_one_looking_away_never():
    tiled = _tiled(context=2, tile=(1, 4, 4))
    chunk = torch.stack([_yaw(20.0), _yaw(20.0)])
    same, away = _yaw(20.0), _yaw(200.0)
    seen = memory_visibility(tiled, torch.stack([same, away]), chunk, BOUNDS, TilePlanParams())
    assert torch.allclose(seen[0], torch.ones(8)) and (seen[1] == 0).all()
    layout = tile_plan(tiled, ["memory", "memory"], torch.stack([same, away]), chunk, BOUNDS, block_q=16, block_k=16)
    mask, frames = layout.to_dense_mask()[0, 0], tiled.key_frame_ids
    assert mask[:, frames == 0].all() and not mask[:, frames == 1].any()


def _reference_visible(memory_pose: torch.Tensor, cameras: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """Reference frustum test on a 12 x 20 grid of 4 x 4 tiles: ``(15,)`` bool, the tiles of the frame
    at ``memory_pose`` of which more than 5% of the pixel-centre rays' points (16 depths in
    ``[near, far]``) lie in an unwidened frustum of one of ``cameras (F, 4, 4)``."""
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(20), indexing="ij")
    x_min, x_max, y_min, y_max = BOUNDS.unbind()
    u = x_min + (cols + 0.5) / 20 * (x_max - x_min)
    v = y_min + (rows + 0.5) / 12 * (y_max - y_min)
    depths = torch.linspace(near, far, 16)
    points = torch.stack([u[..., None] * depths, v[..., None] * depths, depths.expand(12, 20, 16)], -1)
    world = points @ memory_pose[:3, :3].T + memory_pose[:3, 3]
    inside = torch.zeros(12, 20, 16, dtype=torch.bool)
    for camera in cameras:
        inside |= in_frustum((world - camera[:3, 3]) @ camera[:3, :3], BOUNDS, near, far)
    tile_of = (rows // 4) * 5 + cols // 4
    return torch.zeros(15).index_add_(0, tile_of.flatten(), inside.float().mean(-1).flatten()) / 16 > 0.05


def _random_memory(g: torch.Generator, frames: int) -> torch.Tensor:
    return torch.stack([
        _yaw(float(torch.rand(1, generator=g)) * 120 - 60, tuple((torch.randn(3, generator=g) * 2).tolist()))
        for _ in range(frames)
    ])


def test_memory_plans_never_drop_a_tile_a_reference_frustum_test_sees():
    tiled = _tiled(context=6, chunk=2, grid=(12, 20), tile=(1, 4, 4))
    params = TilePlanParams()
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(10):
        chunk = torch.stack([_yaw(float(torch.rand(1, generator=g)) * 30) for _ in range(2)])
        memory = _random_memory(g, 6)
        seen = memory_visibility(tiled, memory, chunk, BOUNDS, params)  # (M, tiles)
        for m in range(6):
            visible = _reference_visible(memory[m], chunk, *params.depth_range)
            checked += int(visible.sum())
            assert (seen[m][visible] > params.min_visibility).all(), f"memory {m}: tiles {visible.nonzero().flatten().tolist()}"
    assert checked > 20  # the cases really contain visible tiles


def test_memory_plans_never_drop_a_tile_seen_only_within_a_narrow_band_of_depths():
    """Cameras turned and tilted every way (``random_poses``): a tile the reference sees only at
    depths between two of a few sampled ones (seed 1340, tiles 11 and 12) is still visited: each
    ray's visible depths are clipped exactly, not sampled."""
    from li_compile.controller.poses import random_poses

    tiled = _tiled(context=4, chunk=2, grid=(12, 20), tile=(1, 4, 4))
    params, checked = TilePlanParams(), 0
    for seed in range(1330, 1350):
        poses = random_poses(6, 2.0, torch.Generator().manual_seed(seed))
        memory, chunk = poses[:4], poses[4:]
        seen = memory_visibility(tiled, memory, chunk, BOUNDS, params)
        for m in range(4):
            visible = _reference_visible(memory[m], chunk, *params.depth_range)
            checked += int(visible.sum())
            assert (seen[m][visible] > params.min_visibility).all(), f"seed {seed} memory {m}: {visible.nonzero().flatten().tolist()}"
    assert checked > 20


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.3, 1.0])
def test_a_cone_share_is_in_frustums_share_of_each_ray_sampled_densely(margin):
    """Each tile's score is the share of its rays' depths (log-spaced over the depth range) inside
    ``in_frustum`` widened by ``margin``, with the near slab ``in_frustum`` treats as a box: within
    0.01 of 2000 sampled depths per ray, and never 0 where the samples see it."""
    from li_compile.controller.poses import random_poses
    from li_compile.controller.tile_plan import CONE_RAYS, cone_seen

    tiled = _tiled(context=3, chunk=1, grid=(12, 20), tile=(1, 4, 4))
    params = TilePlanParams(visibility_margin=margin)
    near, far = params.depth_range
    cell = (torch.arange(CONE_RAYS) + 0.5) / CONE_RAYS
    fu, fv = torch.meshgrid(cell, cell, indexing="ij")
    x_min, x_max, y_min, y_max = BOUNDS.unbind()
    depths = torch.logspace(math.log10(near), math.log10(far), 2000)
    cases = [random_poses(4, 0.1, torch.Generator().manual_seed(seed)) for seed in range(4)]
    for poses in cases:  # cameras 0.1 apart: rays pass through the near slab
        memory, cameras = poses[:3], poses[3:]
        seen = cone_seen(tiled, memory, cameras, BOUNDS, params)[:, 0]  # (M, tiles)
        for m, tile in itertools.product(range(3), range(15)):
            r, c = divmod(tile, 5)
            u = x_min + (c * 4 + 4 * fu.flatten()) / 20 * (x_max - x_min)
            v = y_min + (r * 4 + 4 * fv.flatten()) / 12 * (y_max - y_min)
            points = torch.stack([u[:, None] * depths, v[:, None] * depths, depths.expand(len(u), -1)], -1)
            world = points @ memory[m, :3, :3].T + memory[m, :3, 3]
            local = (world - cameras[0, :3, 3]) @ cameras[0, :3, :3]
            sampled = in_frustum(local, BOUNDS, near, far, margin).float().mean()
            assert abs(float(seen[m, tile]) - float(sampled)) < 0.01, (m, tile)
            assert float(sampled) == 0 or seen[m, tile] > 0


def test_camera_context_rows_never_drop_a_memory_tile_their_own_camera_sees():
    """The ``"camera"`` rule, per context frame: every tile of another memory frame that a reference
    frustum test from that frame's own camera sees is visited by that frame's query rows."""
    tiled = _tiled(queries="all", context=6, chunk=1, grid=(12, 20), tile=(1, 4, 4), prefix=0)
    params = TilePlanParams(context_queries="camera")
    g = torch.Generator().manual_seed(1)
    frames, checked = tiled.key_frame_ids, 0
    for _ in range(4):
        memory = _random_memory(g, 6)
        mask = tile_plan(tiled, ["memory"] * 6, memory, EYE[None], BOUNDS, params, block_q=16, block_k=16).to_dense_mask()[0, 0]
        for f in range(6):
            rows = mask[frames == f]
            for m in range(6):
                visible = _reference_visible(memory[m], memory[f:f + 1], *params.depth_range)
                checked += int(visible.sum())
                visited = rows[:, frames == m].any(0).view(15, 16).all(-1)  # a frame's tokens: 15 tiles of 16, in order
                assert visited[visible].all(), f"frame {f} -> memory {m}: tiles {(visible & ~visited).nonzero().flatten().tolist()}"
    assert checked > 50


def test_a_static_camera_visits_the_same_tile_and_its_neighbours_in_recent_frames():
    tiled = _tiled(context=2, tile=(1, 4, 4))  # 2 x 4 tiles per frame
    window = recent_window(tiled, EYE.expand(2, 4, 4), EYE.expand(1, 4, 4), BOUNDS, TilePlanParams(recent_radius=1))
    h, w = torch.arange(8) // 4, torch.arange(8) % 4
    near = ((h[:, None] - h[None]).abs() <= 1) & ((w[:, None] - w[None]).abs() <= 1)
    assert torch.equal(window[:, 0], near.repeat(2, 1))
    window = recent_window(tiled, EYE.expand(2, 4, 4), EYE.expand(1, 4, 4), BOUNDS, TilePlanParams(recent_radius=0))
    assert torch.equal(window[:, 0], torch.eye(8, dtype=torch.bool).repeat(2, 1))


@settings(max_examples=30, deadline=None)
@given(
    motion=st.sampled_from(["translate", "rotate"]),
    amount=st.floats(-1.0, 1.0),
    depth_at=st.floats(0.0, 1.0),
)
def test_recent_window_contains_where_the_tiles_content_was(motion, amount, depth_at):
    tiled = _tiled(context=2, chunk=1, grid=(16, 32), tile=(1, 4, 4))
    params = TilePlanParams(recent_radius=0)
    recent = _yaw(0.0)
    chunk = _yaw(0.0, (amount, 0.0, 0.3 * amount)) if motion == "translate" else _yaw(15 * amount)
    window = recent_window(tiled, chunk[None], recent[None], BOUNDS, params)[:, 0]  # (32 query tiles, 32 key tiles)
    near, far = params.depth_range
    depth = near * (far / near) ** depth_at  # anywhere in the depth range
    boxes = tiled.key_order.tile_boxes[:32, 1:].float()
    x_min, x_max, y_min, y_max = BOUNDS.unbind()
    for q in range(32):
        row, col = boxes[q].mean(-1)
        x = x_min + col / 32 * (x_max - x_min)
        y = y_min + row / 16 * (y_max - y_min)
        world = chunk[:3, :3] @ torch.stack([x * depth, y * depth, torch.tensor(depth)]) + chunk[:3, 3]
        cam = recent[:3, :3].T @ (world - recent[:3, 3])
        if cam[2] <= 0:
            continue
        tc = int(((cam[0] / cam[2] - x_min) / (x_max - x_min) * 32 // 4).floor())
        tr = int(((cam[1] / cam[2] - y_min) / (y_max - y_min) * 16 // 4).floor())
        if 0 <= tr < 4 and 0 <= tc < 8:
            assert window[q, tr * 8 + tc], f"query tile {q}: content at depth {depth:.2f} was in tile ({tr}, {tc})"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), grid=st.tuples(st.integers(4, 16), st.integers(4, 16)),
       tile=st.tuples(st.integers(1, 4), st.integers(1, 4)), radius=st.integers(0, 1))
def test_the_recent_window_holds_every_in_front_point_of_each_query_tiles_centre_ray(seed, grid, tile, radius):
    """Random camera pairs, so that a ray's depth range often crosses behind the recent camera: at 64
    depths across ``depth_range`` the centre ray's points in front of the recent camera that project
    into its image all land in visited tiles, including where the sampled segment's other end is
    behind it."""
    g = torch.Generator().manual_seed(seed)
    tiled = TiledSequence(SequenceLayout(1, 1, *grid, 0, 0, "chunk"), (1, *tile))
    bounds = bounds_from_fov(float(torch.rand(1, generator=g)) * 60 + 40, float(torch.rand(1, generator=g)) + 0.7)
    recent, chunk = random_poses(2, float(torch.rand(1, generator=g)) * 0.5, g)
    params = TilePlanParams(recent_radius=radius, depth_range=(0.5, 10.0))
    window = recent_window(tiled, chunk[None], recent[None], bounds, params)[:, 0]
    _, nh, nw = tiled.key_order.tiles
    x_min, x_max, y_min, y_max = bounds.unbind()
    depths = torch.logspace(math.log10(0.5), 1.0, 64)
    for q in range(nh * nw):
        row, col = tiled.key_order.tile_boxes[q, 1:].float().mean(-1)
        x, y = x_min + col / grid[1] * (x_max - x_min), y_min + row / grid[0] * (y_max - y_min)
        world = chunk[:3, :3] @ torch.stack([x * depths, y * depths, depths]) + chunk[:3, 3:]
        cam = recent[:3, :3].T @ (world - recent[:3, 3:])  # (3, 64)
        ahead = cam[2] > 1e-3
        tc = ((cam[0, ahead] / cam[2, ahead] - x_min) / (x_max - x_min) * grid[1] // tile[1]).floor().long()
        tr = ((cam[1, ahead] / cam[2, ahead] - y_min) / (y_max - y_min) * grid[0] // tile[0]).floor().long()
        seen = (tr >= 0) & (tr < nh) & (tc >= 0) & (tc < nw)
        landed = (tr * nw + tc)[seen]
        assert window[q, landed].all(), f"query tile {q}: tiles {landed[~window[q, landed]].tolist()} not visited"


def test_context_queries_follow_their_rule_in_the_full_sequence():
    tiled = _tiled(queries="all", context=2, tile=(1, 4, 4))
    poses = torch.stack([_yaw(0.0), _yaw(5.0), _yaw(10.0), _yaw(15.0)])
    frames, q_frames = tiled.key_frame_ids, tiled.key_frame_ids  # queries are the keys
    for rule in ("dense", "frame_local"):
        mask = tile_plan(tiled, ["memory", "recent"], poses[:2], poses[2:], BOUNDS, TilePlanParams(context_queries=rule),
                         block_q=16, block_k=16).to_dense_mask()[0, 0]
        for f in (0, 1):
            rows = mask[q_frames == f]
            expected = torch.ones_like(frames, dtype=torch.bool) if rule == "dense" else (frames == f) | (frames < 0)
            assert torch.equal(rows, expected.expand_as(rows))
        assert mask[q_frames < 0].all()  # prefix queries see every key


def test_camera_context_rows_lie_between_frame_local_and_dense_and_follow_each_frames_own_camera():
    """Context frame 0 looks where memory frame 1 looks and away from memory frame 2: its rows visit
    all of frame 1 and nothing of frame 2; frame 2's rows see frame 0 no more than it sees them.
    Every context row visits its own frame, the whole chunk and the sinks."""
    tiled = _tiled(queries="all", context=3, chunk=1, tile=(1, 4, 4))
    context = torch.stack([_yaw(0.0), _yaw(0.0), _yaw(180.0)])
    chunk = torch.stack([_yaw(0.0)])
    roles = ["recent", "memory", "memory"]
    masks = {
        rule: tile_plan(tiled, roles, context, chunk, BOUNDS, TilePlanParams(context_queries=rule),
                        block_q=16, block_k=16).to_dense_mask()[0, 0]
        for rule in ("frame_local", "camera", "dense")
    }
    assert not (masks["frame_local"] & ~masks["camera"]).any()
    assert not (masks["camera"] & ~masks["dense"]).any()
    frames = tiled.key_frame_ids
    camera = masks["camera"]
    rows_of = {f: camera[frames == f] for f in range(4)}
    assert rows_of[0][:, frames == 1].all() and not rows_of[0][:, frames == 2].any()
    assert not rows_of[2][:, frames == 1].any()
    for f in range(3):
        assert rows_of[f][:, (frames == f) | (frames == 3) | (frames < 0)].all()


def test_the_plan_is_written_in_place_with_fixed_shapes_and_changes_with_the_cameras():
    tiled = _tiled(context=4, tile=(1, 4, 4))
    layout = empty_tile_plan(tiled, capacity=required_capacity(tiled, block_q=16, block_k=16) + 16, block_q=16, block_k=16,
                             heads=3)
    tensors = [layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices, layout.key_keep]
    before = [(t.data_ptr(), t.shape) for t in tensors]
    roles = ["memory", "memory", "recent", "recent"]
    write_tile_plan(layout, tiled, roles, torch.stack([_yaw(0.0)] * 4), torch.stack([_yaw(0.0)] * 2), BOUNDS)
    looking = layout.block_mask().clone()
    write_tile_plan(layout, tiled, roles, torch.stack([_yaw(180.0)] * 2 + [_yaw(0.0)] * 2), torch.stack([_yaw(0.0)] * 2), BOUNDS)
    assert [(t.data_ptr(), t.shape) for t in tensors] == before
    assert not torch.equal(layout.block_mask(), looking)  # the memory frames behind the camera left the plan
    assert layout.block_mask().shape == (1, 3, layout.q_blocks, layout.kv_blocks)


def test_one_plan_per_head_all_alike_is_the_shared_plan_planned_once(monkeypatch):
    """A calibration that chose one plan for every head writes what that plan alone writes, and
    plans it for one head (the host work of a plan grows with the heads it is planned for)."""
    import li_compile.controller.tile_plan as tile_plan_module

    tiled = _tiled(context=4, tile=(1, 4, 4))
    roles = ["memory", "memory", "recent", "recent"]
    poses = torch.stack([_yaw(10.0 * i) for i in range(6)])
    params = TilePlanParams(recent_radius=2, visibility_margin=0.3)
    layouts = [empty_tile_plan(tiled, capacity=required_capacity(tiled, block_q=16, block_k=16) + 16, block_q=16,
                               block_k=16, heads=3) for _ in range(2)]
    planned_heads = []
    write = tile_plan_module.write_priorities_
    monkeypatch.setattr(tile_plan_module, "write_priorities_",
                        lambda layout, prio, *rest: planned_heads.append(prio.shape[1]) or write(layout, prio, *rest))
    write_tile_plan(layouts[0], tiled, roles, poses[:4], poses[4:], BOUNDS, params)
    write_tile_plan(layouts[1], tiled, roles, poses[:4], poses[4:], BOUNDS, [params] * 3)
    assert torch.equal(layouts[0].to_dense_mask(), layouts[1].to_dense_mask())
    assert planned_heads == [1, 1]


def test_a_capacity_cut_drops_the_lowest_priorities_first():
    tiled = _tiled(context=6, chunk=2, tile=(1, 4, 4))
    roles = ["memory"] * 4 + ["recent"] * 2
    g = torch.Generator().manual_seed(3)
    context = torch.stack([_yaw(float(torch.rand(1, generator=g)) * 40 - 20) for _ in range(6)])
    chunk = torch.stack([_yaw(0.0), _yaw(3.0)])
    prio = block_priorities(tiled, tile_priorities(tiled, roles, context, chunk, BOUNDS), 16, 16)
    mandatory = required_capacity(tiled, block_q=16, block_k=16)
    for extra in (0, 4, 12):
        layout = empty_tile_plan(tiled, capacity=mandatory + extra, block_q=16, block_k=16)
        stats = write_priorities_(layout, prio, key_keep(tiled, roles))
        chosen = layout.block_mask()[0, 0]
        candidates = prio > NEVER
        assert chosen[prio >= SINK].all()  # own chunk and sinks always
        lowest_kept = torch.where(chosen, prio, math.inf).amin(-1)
        highest_dropped = torch.where(candidates & ~chosen, prio, NEVER).amax(-1)
        assert (highest_dropped <= lowest_kept).all()
        dropped = candidates & ~chosen
        assert stats.dropped["recent"] + stats.dropped["memory"] == int(dropped.sum())
        if extra == 0:
            assert stats.dropped["recent"] > 0 and not chosen[(prio >= 1) & (prio < RECENT)].any()


def test_a_dense_span_counts_as_visited_for_every_head_and_is_left_out_of_the_lists():
    """One plan for every head (planned once, broadcast); the chunk's key blocks, which SDPA runs
    (``dense_span``), are in the density but in neither list; the rest is the plan without a span."""
    tiled = _tiled(context=4, tile=(1, 4, 4))
    roles, poses = ["memory", "memory", "recent", "recent"], torch.stack([_yaw(0.0)] * 4)
    span = (tiled.sequence.context_frames * 8, tiled.sequence.kv_len // 16)  # 8 blocks of 16 per frame
    layouts, stats = [], []
    for dense_span in ((0, 0), span):
        layout = empty_tile_plan(tiled, capacity=required_capacity(tiled, block_q=16, block_k=16) + 16, block_q=16,
                                 block_k=16, heads=3)
        stats.append(write_tile_plan(layout, tiled, roles, poses, poses[:2], BOUNDS, dense_span=dense_span))
        layouts.append(layout.block_mask())
    whole, split = layouts
    assert stats[0].density == stats[1].density and stats[0].visited == 3 * int(whole[0, 0].sum())
    assert whole[..., span[0]:span[1]].all() and not split[..., span[0]:span[1]].any()
    outside = torch.ones(whole.shape[-1], dtype=torch.bool)
    outside[span[0]:span[1]] = False
    assert torch.equal(split[..., outside], whole[..., outside]) and torch.equal(whole[:, 0], whole[:, 2])


def test_a_buffer_below_the_mandatory_blocks_is_refused_and_bad_params_are_named():
    tiled = _tiled(context=2, tile=(1, 4, 4))
    mandatory = required_capacity(tiled, block_q=16, block_k=16)
    layout = empty_tile_plan(tiled, capacity=mandatory - 1, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=f"capacity {mandatory - 1} is below the {mandatory} key blocks"):
        write_tile_plan(layout, tiled, ["memory", "recent"], torch.stack([EYE] * 2), torch.stack([EYE] * 2), BOUNDS)
    with pytest.raises(ValueError, match="capacity must be an int in"):
        empty_tile_plan(tiled, capacity=10**6, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"roles\[1\] must be one of"):
        tile_priorities(tiled, ["memory", "future"], torch.stack([EYE] * 2), torch.stack([EYE] * 2), BOUNDS)
    for bad, words in [
        ({"recent_radius": -1}, "recent_radius must be an int >= 0"),
        ({"depth_range": (2.0, 1.0)}, "depth_range must be"),
        ({"visibility_margin": -0.1}, "visibility_margin must be >= 0"),
        ({"min_visibility": 1.0}, "min_visibility must be in"),
        ({"context_queries": "causal"}, "context_queries must be one of"),
    ]:
        with pytest.raises(ValueError, match=words):
            TilePlanParams(**bad)
