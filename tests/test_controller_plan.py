"""The attention plan the controller writes: dropped context never visited, guards, one plan per model."""

import pytest
import torch

from li_compile.controller.attention_plan import (
    frame_drop_layout, kernel_density, padded_context_keep, token_keep, visited_share, write_chunk_plan,
)
from li_compile.controller.context import ContextController
from li_compile.options import ContextOptions
from li_compile.passes.guards import layout_misfit, plan_fits, take_fallbacks, write_plan
from li_compile.plan import Plan, SlotSignature
from li_compile.sequence import SequenceLayout

GRID = 3  # 3 x 3 = 9 tokens per frame: frames straddle 8-token blocks
BLOCK = 8


def _sequence(context: int, queries: str = "all", prefix: int = 0) -> SequenceLayout:
    return SequenceLayout(context, 2, GRID, GRID, prefix_tokens=prefix, queries=queries)


def _slot(plan: Plan, seq: SequenceLayout, block: int = BLOCK):
    return plan.slot_for(SlotSignature(1, 2, seq.q_len, seq.kv_len, "cpu", block, block))


@pytest.mark.parametrize("queries", ["all", "chunk"])
@pytest.mark.parametrize("kept", [0, 1, 3, 4])
def test_dropped_context_tokens_are_never_visited(queries, kept):
    seq = _sequence(4, queries, prefix=3)
    keep = padded_context_keep(kept, 4)
    layout = frame_drop_layout(seq, keep, BLOCK, BLOCK)
    tokens = token_keep(seq, keep)
    visible = layout.to_dense_mask()[0, 0]  # (q_len, kv_len)
    assert not visible[:, ~tokens].any()
    rows = tokens if queries == "all" else torch.ones(seq.q_len, dtype=torch.bool)
    assert visible[rows][:, tokens].all()  # every kept query sees every kept key
    # 9-token frames straddle 8-token blocks: one dropped frame (kept=3) empties no whole block
    assert (kept <= 1) == (layout.density < 1.0)


@pytest.mark.parametrize("queries", ["all", "chunk"])
@pytest.mark.parametrize("kept", [0, 2, 3])
@pytest.mark.parametrize("grid, block", [(4, 16), (GRID, BLOCK)])
def test_visited_share_is_the_share_of_kept_token_pairs_and_bounds_the_block_density(queries, kept, grid, block):
    """Frames of whole blocks (16 tokens, blocks of 16): the plan's density is exactly the share of
    kept (query, key) pairs; frames straddling blocks: a little more, never less."""
    seq = SequenceLayout(4, 2, grid, grid, queries=queries)
    keep = padded_context_keep(kept, 4)
    pairs = frame_drop_layout(seq, keep, 1, 1).density  # token-level blocks: every pair counted
    assert visited_share(seq, kept) == pytest.approx(pairs, abs=1e-6)  # density is float32
    density = frame_drop_layout(seq, keep, block, block).density
    assert density == pytest.approx(pairs, abs=1e-6) if grid == 4 else density >= pairs - 1e-6


def test_full_blocks_hold_only_kept_tokens():
    seq = _sequence(4)
    keep = padded_context_keep(2, 4)
    layout = frame_drop_layout(seq, keep, BLOCK, BLOCK)
    full_blocks = layout.block_mask(full_only=True)[0, 0].any(0)
    tokens = token_keep(seq, keep)
    for block in torch.nonzero(full_blocks).flatten().tolist():
        assert tokens[block * BLOCK:(block + 1) * BLOCK].all()


def test_padding_comes_first_in_the_context_slots():
    assert padded_context_keep(2, 5).tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match=r"kept frames must be in \[0, capacity=2\], got 3"):
        padded_context_keep(3, 2)
    with pytest.raises(ValueError, match="context_keep must be bool"):
        token_keep(_sequence(4), torch.ones(3, dtype=torch.bool))


def test_chunk_plan_is_sparse_when_frames_drop_and_dense_when_all_are_kept():
    plan = Plan()
    seq = _sequence(4)
    assert write_chunk_plan(plan, seq, padded_context_keep(4, 4))["plan"] == "no site"
    slot = _slot(plan, seq)
    stats = write_chunk_plan(plan, seq, padded_context_keep(1, 4))
    assert stats["plan"] == "sparse" and stats["density"] < 1 and stats["slots"] == [slot.id]
    assert not slot.is_dense and not slot.key_keep[0, : 3 * GRID * GRID].any()
    assert write_chunk_plan(plan, seq, padded_context_keep(4, 4))["plan"] == "dense" and slot.is_dense


def test_a_plan_for_another_model_raises_and_leaves_slots_untouched():
    plan = Plan()
    ours, other = _sequence(4), _sequence(3)
    slot = _slot(plan, ours)
    layout = frame_drop_layout(other, padded_context_keep(1, 3), BLOCK, BLOCK)
    assert "plan for another model" in layout_misfit(slot, layout)
    with pytest.raises(ValueError, match=r"plan for another model: layout \(q_len, kv_len, block_q, block_k\)"):
        write_plan([slot], layout)
    assert slot.is_dense
    coarse = frame_drop_layout(ours, padded_context_keep(1, 4), 16, 16)
    with pytest.raises(ValueError, match="plan for another model"):
        write_plan([slot], coarse)


def test_run_time_misfit_is_recorded_and_collected_per_chunk():
    plan = Plan()
    seq = _sequence(4)
    slot = _slot(plan, seq)
    q = torch.zeros(1, 2, seq.q_len, 4)
    assert plan_fits(slot, q, q, slot.tensors())
    short = torch.zeros(1, 2, seq.q_len - 1, 4)
    assert not plan_fits(slot, short, short, slot.tensors())
    fallbacks = take_fallbacks(plan)
    assert list(fallbacks.values()) == [1] and "call shape" in next(iter(fallbacks))
    assert take_fallbacks(plan) == {}


def test_a_plan_written_for_one_model_never_reaches_another_models_slots():
    ours, theirs = Plan(), Plan()
    seq = _sequence(4)
    mine, other = _slot(ours, seq), _slot(theirs, seq)  # same signature, two models
    assert mine.id != other.id
    write_chunk_plan(ours, seq, padded_context_keep(1, 4))
    assert not mine.is_dense and other.is_dense


def test_controller_writes_the_plan_of_its_capacity_and_a_disabled_one_keeps_it_dense():
    from li_compile.controller.poses import make_poses

    def layout(capacity: int) -> SequenceLayout:
        return SequenceLayout(capacity, 1, GRID, GRID, prefix_tokens=5)  # shapes no other test uses

    options = {"window_min": 1, "window_max": 2, "window_rule": "fixed"}
    past, chunk = make_poses(torch.eye(3), torch.zeros(2, 3)), make_poses(torch.eye(3), torch.zeros(1, 3))
    latents = torch.randn(2, 4, 4, 4)
    plan = Plan()
    slot = _slot(plan, layout(4))  # memory_k 2 + window 2 = 4: buckets 1, 2, 3, 4
    controller = ContextController(ContextOptions(**options), plan, memory_k=2, layout=layout, capacity_fractions=(1.0,))
    assert controller.select(0, past, chunk, latents).capacity == 4  # 2 recent frames in 4 slots
    assert controller.stats[-1].values["plan"] == "sparse" and not slot.is_dense
    disabled = ContextController(ContextOptions(**options, enabled=False), plan, memory_k=2, layout=layout)
    disabled.select(0, past, chunk, latents)
    assert disabled.stats[-1].values["plan"] == "dense" and slot.is_dense


@pytest.mark.parametrize("queries, rule", [("all", "frame_local"), ("all", "dense"), ("all", "camera"), ("chunk", "frame_local")])
def test_a_split_tile_plan_visits_exactly_what_the_tile_plan_allows(queries, rule):
    """The chunk's span goes through SDPA for every query row, so it is split off only where every
    row's plan visits it whole: the written blocks plus the span equal the tile plan, per rule."""
    from li_compile.controller.attention_plan import tile_shape, write_tile_chunk_plan
    from li_compile.controller.poses import bounds_from_fov, make_poses
    from li_compile.controller.tile_plan import TilePlanParams, empty_tile_plan, write_tile_plan
    from li_compile.kernels.block_layout import BlockLayout
    from li_compile.options import SparsityOptions
    from li_compile.tiled_sequence import TiledSequence

    seq = SequenceLayout(3, 2, 8, 8, prefix_tokens=4, queries=queries)
    tiled = TiledSequence(seq, tile_shape(16))
    plan, params = Plan(), TilePlanParams(context_queries=rule)
    slot = plan.slot_for(SlotSignature(1, 1, seq.q_len, seq.kv_len, "cpu", 16, 16))
    poses = make_poses(torch.eye(3), torch.tensor([[0.0, 0.0, 0.1 * i] for i in range(5)]))
    roles, bounds = ["memory", "recent", "recent"], bounds_from_fov(60.0, 1.0)
    stats = write_tile_chunk_plan(plan, tiled, roles, poses[:3], poses[3:], bounds, params, SparsityOptions(max_density=1.0))
    assert stats["plan"] == "sparse"
    reference = empty_tile_plan(tiled, capacity=-(-seq.kv_len // 16), block_q=16, block_k=16)
    write_tile_plan(reference, tiled, roles, poses[:3], poses[3:], bounds, params)
    visited = BlockLayout(*slot.tensors(), block_q=16, block_k=16, q_len=seq.q_len, kv_len=seq.kv_len).to_dense_mask()
    first, end = slot.dense_span
    visited[..., first * 16:end * 16] = True
    assert (first < end) == (queries == "chunk" or rule != "frame_local")
    assert torch.equal(visited, reference.to_dense_mask())


def test_the_chunk_key_span_is_the_chunks_keys_with_sinks_in_place_and_shifted_onto_sinks_with_sinks_at_the_end():
    """``chunk_key_span`` counts from the chunk's token-order position. With the prefix in place that
    is its tile-order position too; with ``sinks="end"`` (the controller's) the prefix sits behind the
    video, so the span starts a prefix later: past the chunk's first keys, into sink keys (which
    every row visits as well)."""
    from li_compile.controller.attention_plan import chunk_key_span, tile_shape
    from li_compile.tiled_sequence import TiledSequence

    seq = SequenceLayout(2, 2, 4, 8, prefix_tokens=16, queries="all")
    first, end = chunk_key_span(seq, 16)
    in_place = TiledSequence(seq, tile_shape(16), sinks="in_place").key_frame_ids[first * 16:end * 16]
    assert (in_place >= seq.context_frames).all() and len(in_place) == seq.chunk_frames * seq.tokens_per_frame
    at_end = TiledSequence(seq, tile_shape(16)).key_frame_ids
    chunk_start = int((at_end >= seq.context_frames).nonzero()[0])
    assert first * 16 == chunk_start + seq.prefix_tokens  # shifted by the prefix
    assert set(at_end[first * 16:end * 16].tolist()) == {2, 3, -1}  # chunk frames and sinks only


def test_max_density_judges_the_share_the_kernel_runs_outside_the_flash_span():
    """A chunk-query plan of density 0.7 whose chunk span (0.5 of the keys, run by SDPA) is visited
    whole leaves the kernel 0.4 of its pairs: sparse under ``max_density`` 0.6; with no span, the
    plan's own density decides."""
    assert kernel_density(0.7, (5, 10), 10) == pytest.approx(0.4)
    assert kernel_density(0.7, (0, 0), 10) == 0.7
    assert kernel_density(1.0, (0, 10), 10) == 1.0  # the span is every key: the plan is dense


def test_a_host_layout_fits_a_slot_on_any_device_but_another_device_does_not():
    seq = SequenceLayout(3, 1, 2, 2)
    layout = frame_drop_layout(seq, padded_context_keep(1, 3), BLOCK, BLOCK)
    on = lambda device: Plan().slot_for(SlotSignature(1, 2, seq.q_len, seq.kv_len, device, BLOCK, BLOCK))  # noqa: E731
    assert layout_misfit(on("meta"), layout) is None  # a host layout: set_layout uploads it
    assert "is on meta" in layout_misfit(on("cpu"), layout.to("meta"))
