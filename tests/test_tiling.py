"""3D tile order and layout builders: the order round-trips and groups each tile's tokens together;
every builder's layout visits what its docstring says (dropped frames never, window pairs always)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.kernels.block_layout import BlockLayout, cdiv
from li_compile.kernels.block_sparse_attention import sparse_attention
from li_compile.kernels.tiling import TileOrder, frame_layout, local_window_layout, topk_layout, union

orders = st.builds(
    TileOrder,
    frames=st.integers(1, 4),
    grid_h=st.integers(1, 9),
    grid_w=st.integers(1, 9),
    tile=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)),
    prefix=st.integers(0, 3),
    suffix=st.integers(0, 3),
)


@settings(max_examples=60, deadline=None)
@given(order=orders)
def test_tile_order_round_trips_and_keeps_each_tile_contiguous(order):
    x = torch.randn(2, order.length, 3)
    assert torch.equal(order.unpermute(order.permute(x)), x)
    assert torch.equal(order.perm.sort().values, torch.arange(order.length))
    ids = order.tile_ids
    video = ids[order.prefix : order.prefix + order.video_tokens]
    assert (ids[: order.prefix] == -1).all() and (ids[order.prefix + order.video_tokens :] == -1).all()
    assert (video.diff() >= 0).all()  # tiles appear one after another, each contiguous
    # every token in a tile shares its (t, h, w) tile coordinates
    raster = order.perm[order.prefix : order.prefix + order.video_tokens] - order.prefix
    f = raster // (order.grid_h * order.grid_w)
    h = raster // order.grid_w % order.grid_h
    w = raster % order.grid_w
    coords = torch.stack([f // order.tile[0], h // order.tile[1], w // order.tile[2]], -1)
    for tile in video.unique():
        assert (coords[video == tile] == coords[video == tile][0]).all()


def test_whole_tiles_fill_one_block_each():
    order = TileOrder(frames=2, grid_h=16, grid_w=32, tile=(1, 8, 16))
    ids = order.tile_ids.view(-1, 128)
    assert (ids == ids[:, :1]).all() and ids[:, 0].tolist() == list(range(8))


def test_tile_order_rejects_bad_shapes():
    with pytest.raises(ValueError, match="tile"):
        TileOrder(frames=1, grid_h=4, grid_w=4, tile=(0, 2, 2))
    with pytest.raises(ValueError, match="tokens"):
        TileOrder(frames=1, grid_h=4, grid_w=4).permute(torch.randn(10, 3))


@settings(max_examples=40, deadline=None)
@given(
    frames=st.integers(1, 6),
    tokens=st.integers(1, 20),
    prefix=st.integers(0, 5),
    block_k=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_frame_layout_shows_exactly_the_kept_frames_and_never_visits_dropped_ones(frames, tokens, prefix, block_k, seed):
    g = torch.Generator().manual_seed(seed)
    keep_frames = torch.rand(frames, generator=g) < 0.5
    key_frames = torch.cat([torch.full((prefix,), -1), torch.arange(frames).repeat_interleave(tokens)])
    layout = frame_layout(keep_frames, key_frames, 10, block_q=8, block_k=block_k)
    visible_keys = (key_frames < 0) | keep_frames[key_frames.clamp_min(0)]
    assert torch.equal(layout.to_dense_mask()[0, 0], visible_keys.expand(10, -1))
    padded = torch.cat([visible_keys, visible_keys.new_zeros(layout.kv_blocks * block_k - visible_keys.numel())])
    assert torch.equal(layout.block_mask()[0, 0, 0], padded.view(-1, block_k).any(-1))  # dropped-only blocks unlisted


def test_dropped_frames_never_reach_attention():
    order = TileOrder(frames=5, grid_h=4, grid_w=8, tile=(1, 4, 4), prefix=3)
    keep_frames = torch.tensor([True, False, False, True, True])
    layout = frame_layout(keep_frames, order.frame_ids, 32, block_q=16, block_k=16)
    q = torch.randn(1, 2, 32, 16)
    k, v = torch.randn(1, 2, order.length, 16), torch.randn(1, 2, order.length, 16)
    kept = (order.frame_ids < 0) | keep_frames[order.frame_ids.clamp_min(0)]
    expected = F.scaled_dot_product_attention(q, k[:, :, kept], v[:, :, kept])
    k[:, :, ~kept], v[:, :, ~kept] = float("nan"), float("nan")
    torch.testing.assert_close(sparse_attention(q, k, v, layout), expected, atol=2e-5, rtol=1e-4)


def window_mask(query, key, window, offset):
    """Token-level reference: (t, h, w) tile-coordinate distance within window; specials see all."""

    def coords(order, frame_offset):
        raster = order.perm - order.prefix
        video = (raster >= 0) & (raster < order.video_tokens)
        r = raster.clamp(0, order.video_tokens - 1)
        f = r // (order.grid_h * order.grid_w) + frame_offset
        h, w = r // order.grid_w % order.grid_h, r % order.grid_w
        return torch.stack([f // order.tile[0], h // order.tile[1], w // order.tile[2]], -1), video

    qc, qv = coords(query, offset)
    kc, kv = coords(key, 0)
    near = ((qc[:, None] - kc[None]).abs() <= torch.tensor(window)).all(-1)
    return near | ~qv[:, None] | ~kv[None, :]


@settings(max_examples=30, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    tile=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
    window=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    chunk_tiles=st.integers(1, 2),
    context_tiles=st.integers(0, 2),
    block=st.sampled_from([4, 8]),
)
def test_local_window_layout_covers_every_pair_in_the_window(grid, tile, window, chunk_tiles, context_tiles, block):
    chunk, context = chunk_tiles * tile[0], context_tiles * tile[0]
    query = TileOrder(chunk, *grid, tile=tile, prefix=1)
    key = TileOrder(context + chunk, *grid, tile=tile, prefix=1)
    layout = local_window_layout(query, key, window, query_frame_offset=context, block_q=block, block_k=block)
    want = window_mask(query, key, window, context)
    got = layout.to_dense_mask()[0, 0]
    assert not (want & ~got).any()  # a superset of the window ...


def test_local_window_is_exact_when_blocks_are_whole_tiles():
    query = TileOrder(2, 8, 8, tile=(1, 4, 4))
    key = TileOrder(6, 8, 8, tile=(1, 4, 4))
    layout = local_window_layout(query, key, (1, 1, 0), query_frame_offset=4, block_q=16, block_k=16)
    assert torch.equal(layout.to_dense_mask()[0, 0], window_mask(query, key, (1, 1, 0), 4))  # ... and exact here
    assert layout.density < 0.5


@pytest.mark.parametrize("offset", [-1, 2, 5])
def test_local_window_query_frames_outside_the_key_frames_are_refused_naming_the_range(offset):
    """One query frame over two key frames: offsets 0 and 1 place it on a key frame; others would
    leave every query with no video key to see."""
    query, key = TileOrder(1, 2, 2, (1, 1, 1)), TileOrder(2, 2, 2, (1, 1, 1))
    with pytest.raises(ValueError, match=rf"query_frame_offset must be an int in \[0, 1\] .* got {offset}"):
        local_window_layout(query, key, (0, 0, 0), query_frame_offset=offset, block_q=1, block_k=1)


def test_layout_builders_name_a_block_size_that_is_not_a_positive_int():
    order = TileOrder(2, 2, 2, (1, 1, 1))
    q = k = torch.randn(1, 1, order.length, 4)
    builders = [
        ("block_k", lambda: frame_layout(torch.ones(2, dtype=torch.bool), order.frame_ids, order.length, block_k=0)),
        ("block_q", lambda: local_window_layout(order, order, (0, 0, 0), block_q=0)),
        ("block_k", lambda: topk_layout(q, k, 0.5, block_k=16.0)),
    ]
    for name, build in builders:
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            build()


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_topk_layout_keeps_the_most_similar_key_blocks_within_the_budget(density):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 40, 16, generator=g), torch.randn(2, 2, 72, 16, generator=g)
    layout = topk_layout(q, k, density, block_q=8, block_k=8)
    blocks = layout.block_mask()
    per_row = math.ceil(density * layout.kv_blocks)
    assert (blocks.sum(-1) == per_row).all()
    pooled_q = q.view(2, 4, 5, 8, 16).mean(3)
    pooled_k = k.view(2, 2, 9, 8, 16).mean(3).repeat_interleave(2, 1)
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    chosen_min = scores.masked_fill(~blocks, float("inf")).min(-1).values
    other_max = scores.masked_fill(blocks, float("-inf")).max(-1).values
    assert (chosen_min >= other_max).all()


def test_topk_layout_always_includes_the_forced_blocks():
    q, k = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 64, 8)
    always = torch.zeros(4, 8, dtype=torch.bool)
    always[:, -1] = True
    layout = topk_layout(q, k, 0.125, block_q=8, block_k=8, always=always)
    assert layout.block_mask()[..., -1].all()
    with pytest.raises(ValueError, match="density"):
        topk_layout(q, k, 0.0)


def test_union_visits_what_any_layout_visits():
    g = torch.Generator().manual_seed(3)
    a = BlockLayout.from_block_mask(torch.rand(1, 2, 3, 5, generator=g) < 0.4, block_q=8, block_k=8, q_len=20, kv_len=40)
    keep = torch.rand(1, 40, generator=g) < 0.5
    b = BlockLayout.from_block_mask(torch.rand(3, 5, generator=g) < 0.4, block_q=8, block_k=8, q_len=20, kv_len=40, key_keep=keep)
    both = union(a, b)
    assert torch.equal(both.block_mask(), a.block_mask() | b.block_mask())
    dense = both.to_dense_mask()
    assert not (a.to_dense_mask() & ~dense).any() and not (b.to_dense_mask() & ~dense).any()
    with pytest.raises(ValueError, match="different"):
        union(a, BlockLayout.dense(block_q=8, block_k=16, q_len=20, kv_len=40))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_topk_within_a_layout_never_leaves_it_and_keeps_its_full_split_and_key_keep(density):
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 72, 16, generator=g)
    blocks = torch.rand(1, 1, 5, 9, generator=g) < 0.6
    blocks[..., 0] = True
    full = blocks & (torch.rand(1, 1, 5, 9, generator=g) < 0.5)
    keep = torch.rand(1, 72, generator=g) < 0.7
    within = BlockLayout.from_block_mask(blocks, block_q=8, block_k=8, q_len=40, kv_len=72, full=full, key_keep=keep)
    layout = topk_layout(q, k, density, block_q=8, block_k=8, within=within)
    chosen = layout.block_mask()
    assert not (chosen & ~blocks).any()
    quota = torch.ceil(density * blocks.sum(-1)).clamp_min(1)
    assert torch.equal(chosen.sum(-1), quota.expand(1, 2, 5).to(chosen.sum(-1).dtype))
    assert torch.equal(layout.block_mask(full_only=True), chosen & full)
    assert torch.equal(layout.key_keep, keep)
    if density == 1.0:
        assert torch.equal(layout.to_dense_mask(), within.to_dense_mask().expand(1, 2, -1, -1))


@pytest.mark.parametrize("q_len, kv_len, block_q, block_k", [(40, 40, 8, 8), (24, 72, 8, 16), (13, 29, 4, 4), (30, 30, 16, 8)])
def test_own_blocks_hold_each_querys_own_position_aligned_to_the_end_of_the_keys(q_len, kv_len, block_q, block_k):
    from li_compile.kernels.tiling import own_blocks

    own = own_blocks(q_len, kv_len, block_q, block_k)
    expected = torch.zeros(cdiv(q_len, block_q), cdiv(kv_len, block_k), dtype=torch.bool)
    for i in range(q_len):
        expected[i // block_q, (i + kv_len - q_len) // block_k] = True
    assert torch.equal(own, expected)
    with pytest.raises(ValueError, match="aligned"):
        own_blocks(kv_len + 1, kv_len, block_q, block_k)


@settings(max_examples=40, deadline=None)
@given(order=orders)
def test_tile_boxes_cover_exactly_the_tokens_of_each_tile(order):
    raster = order.perm[order.prefix : order.prefix + order.video_tokens] - order.prefix
    coords = torch.stack(
        [raster // (order.grid_h * order.grid_w), raster // order.grid_w % order.grid_h, raster % order.grid_w], -1
    )
    ids = order.tile_ids[order.prefix : order.prefix + order.video_tokens]
    boxes = order.tile_boxes[ids]  # (tokens, 3, 2)
    assert ((coords >= boxes[..., 0]) & (coords < boxes[..., 1])).all()
    sizes = (order.tile_boxes[..., 1] - order.tile_boxes[..., 0]).prod(-1)
    assert torch.equal(sizes, torch.bincount(ids, minlength=math.prod(order.tiles)))
