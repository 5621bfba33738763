"""Tile order at a rewritten site, both sequence forms: the permutations round-trip, prefix and suffix
tokens stay in place, the KV-cache form's key order is the context's order then the chunk's (so the
cache is permuted once), and dense attention in tile order gives the model's output back."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence


@st.composite
def tiled_sequences(draw):
    tile = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    sequence = SequenceLayout(
        context_frames=tile[0] * draw(st.integers(0, 3)),
        chunk_frames=draw(st.integers(1, 4)),
        grid_h=draw(st.integers(1, 7)),
        grid_w=draw(st.integers(1, 7)),
        prefix_tokens=draw(st.integers(0, 3)),
        suffix_tokens=draw(st.integers(0, 3)),
        queries=draw(st.sampled_from(["all", "chunk"])),
    )
    return TiledSequence(sequence, tile, draw(st.sampled_from(["end", "in_place"])))


@settings(max_examples=60, deadline=None)
@given(tiled=tiled_sequences())
def test_permutations_round_trip_and_keep_prefix_and_suffix_in_place(tiled):
    s = tiled.sequence
    q = torch.randn(2, s.q_len, 3)
    k = torch.randn(2, s.kv_len, 3)
    assert torch.equal(tiled.unpermute_outputs(tiled.permute_queries(q)), q)
    assert torch.equal(tiled.unpermute_keys(tiled.permute_keys(k)), k)
    assert torch.equal(tiled.query_perm[tiled.query_inverse], torch.arange(s.q_len))
    assert torch.equal(tiled.key_perm[tiled.key_inverse], torch.arange(s.kv_len))
    keys, video = tiled.key_perm, s.frames * s.tokens_per_frame
    prefix, suffix = torch.arange(s.prefix_tokens), torch.arange(s.kv_len - s.suffix_tokens, s.kv_len)
    if tiled.sinks == "in_place":
        assert torch.equal(keys[: s.prefix_tokens], prefix) and torch.equal(keys[s.prefix_tokens + video :], suffix)
    else:
        assert torch.equal(keys[video:], torch.cat([prefix, suffix]))
    assert torch.equal(tiled.key_tile_ids < 0, tiled.key_frame_ids < 0)
    assert torch.equal(tiled.key_frame_ids[tiled.key_inverse], torch.cat([
        torch.full((s.prefix_tokens,), -1), torch.arange(s.frames).repeat_interleave(s.tokens_per_frame),
        torch.full((s.suffix_tokens,), -1)]))


def test_with_sinks_at_the_end_every_block_of_a_tile_is_one_whole_tile_whatever_the_prefix():
    tiled = TiledSequence(SequenceLayout(4, 2, 16, 16, prefix_tokens=16, suffix_tokens=3), (2, 8, 8))
    video = tiled.key_tile_ids[: 6 * 256].view(-1, 128)
    assert (video == video[:, :1]).all() and video[:, 0].tolist() == list(range(12))
    assert (tiled.key_tile_ids[6 * 256 :] == -1).all()


@settings(max_examples=60, deadline=None)
@given(tiled=tiled_sequences())
def test_kv_cache_keys_are_the_context_in_tile_order_then_the_chunk_in_query_order(tiled):
    s = tiled.sequence
    if s.queries != "chunk":
        return
    context_tokens = s.context_frames * s.tokens_per_frame
    context = TiledSequence(SequenceLayout(0, s.context_frames, s.grid_h, s.grid_w, queries="chunk"), tiled.tile) if context_tokens else None
    parts = []
    if context is not None:
        parts.append(context.query_perm + s.prefix_tokens)
    parts.append(tiled.query_perm + s.prefix_tokens + context_tokens)
    prefix, suffix = torch.arange(s.prefix_tokens), torch.arange(s.kv_len - s.suffix_tokens, s.kv_len)
    parts = [prefix, *parts, suffix] if tiled.sinks == "in_place" else [*parts, prefix, suffix]
    assert torch.equal(tiled.key_perm, torch.cat(parts))
    start = s.prefix_tokens + context_tokens if tiled.sinks == "in_place" else context_tokens
    # the chunk's own keys, permuted like the queries, sit where the chunk's key tiles start
    chunk_keys = tiled.key_perm[start : start + s.q_len]
    assert torch.equal(chunk_keys - s.prefix_tokens - context_tokens, tiled.query_perm)


@settings(max_examples=30, deadline=None)
@given(tiled=tiled_sequences(), seed=st.integers(0, 2**16))
def test_dense_attention_in_tile_order_gives_the_models_output_back(tiled, seed):
    s = tiled.sequence
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, s.q_len, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, s.kv_len, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, s.kv_len, 4, generator=g, dtype=torch.float64)
    tiled_out = F.scaled_dot_product_attention(tiled.permute_queries(q), tiled.permute_keys(k), tiled.permute_keys(v))
    torch.testing.assert_close(tiled.unpermute_outputs(tiled_out), F.scaled_dot_product_attention(q, k, v))


def test_query_tiles_start_after_the_context_tiles_in_chunk_form():
    s = SequenceLayout(context_frames=4, chunk_frames=2, grid_h=16, grid_w=16, prefix_tokens=5, queries="chunk")
    tiled = TiledSequence(s, (2, 8, 8))
    assert tiled.context_tiles == 2 * 4 and tiled.query_tile_offset == 8
    assert TiledSequence(SequenceLayout(4, 2, 16, 16), (2, 8, 8)).query_tile_offset == 0


def test_a_tile_that_would_mix_context_and_chunk_frames_is_rejected():
    with pytest.raises(ValueError, match=r"context_frames \(3\) must be a multiple of the tile's frames \(2\)"):
        TiledSequence(SequenceLayout(3, 2, 8, 8), (2, 8, 8))
    with pytest.raises(ValueError, match="tile must be three positive ints"):
        TiledSequence(SequenceLayout(2, 2, 8, 8), (2, 0, 8))
