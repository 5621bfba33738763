"""BlockLayout: built from block masks, pictured, validated; it round-trips its blocks and fits a plan slot."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.kernels.block_layout import BlockLayout, cdiv, validate_layout
from li_compile.kernels.block_sparse_attention import sparse_attention
from li_compile.plan import Plan, SlotSignature
from li_compile.planned_attention import planned_attention


@settings(max_examples=50, deadline=None)
@given(
    lead=st.sampled_from([(1, 1), (2, 1), (1, 3), (2, 3)]),
    q_len=st.integers(1, 50),
    kv_len=st.integers(1, 50),
    block_q=st.sampled_from([4, 8, 16]),
    block_k=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_from_block_mask_round_trips_its_blocks_and_splits_full_from_partial(lead, q_len, kv_len, block_q, block_k, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, cdiv(q_len, block_q), cdiv(kv_len, block_k))
    blocks = torch.rand(shape, generator=g) < 0.5
    full = blocks & (torch.rand(shape, generator=g) < 0.5)
    keep = torch.rand(lead[0], kv_len, generator=g) < 0.5
    layout = BlockLayout.from_block_mask(blocks, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, full=full, key_keep=keep)
    assert torch.equal(layout.block_mask(), blocks)
    assert torch.equal(layout.block_mask(full_only=True), full)
    assert torch.equal(layout.block_mask(partial_only=True), blocks & ~full)
    assert layout.density == pytest.approx(blocks.float().mean().item())
    tokens = lambda b: b.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[..., :q_len, :kv_len]  # noqa: E731
    expected = tokens(full) | (tokens(blocks & ~full) & keep[:, None, None, :])
    assert torch.equal(layout.to_dense_mask(), expected)


def test_dense_layout_visits_everything_as_full_blocks():
    layout = BlockLayout.dense(block_q=16, block_k=16, q_len=40, kv_len=33)
    assert layout.density == 1.0 and layout.to_dense_mask().all()
    assert not layout.block_mask(partial_only=True).any()
    assert layout.picture() == "###\n###\n###"


def test_repr_and_picture_are_readable():
    blocks = torch.tensor([[True, False], [True, True]])
    layout = BlockLayout.from_block_mask(blocks, block_q=8, block_k=8, q_len=16, kv_len=16, full=torch.tensor([[True, False], [False, False]]))
    text = repr(layout)
    for part in ("q_len=16", "kv_len=16", "blocks=8x8", "grid=2x2", "density=0.750"):
        assert part in text
    assert layout.picture() == "#.\n++"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_q": 0}, "block_q"),
        ({"kv_num_blocks": torch.zeros(1, 1, 3, dtype=torch.int64)}, "int32"),
        ({"kv_num_blocks": torch.zeros(1, 1, 5, dtype=torch.int32)}, "kv_num_blocks"),
        ({"kv_indices": torch.zeros(1, 2, 3, 4, dtype=torch.int32)}, "kv_indices"),
        ({"key_keep": torch.ones(1, 7, dtype=torch.bool)}, "key_keep"),
        ({"full_kv_num_blocks": torch.zeros(1, 1, 3, dtype=torch.int32)}, "both"),
    ],
    ids=["block_size", "index_dtype", "query_blocks", "indices_shape", "keep_length", "full_pair"],
)
def test_invalid_fields_are_named_in_the_error(kwargs, match):
    base = dict(
        kv_num_blocks=torch.zeros(1, 1, 3, dtype=torch.int32), kv_indices=torch.zeros(1, 1, 3, 4, dtype=torch.int32),
        full_kv_num_blocks=None, full_kv_indices=None, key_keep=None, block_q=8, block_k=8, q_len=20, kv_len=30,
    )
    with pytest.raises(ValueError, match=match):
        BlockLayout(**{**base, **kwargs})


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "lists",
    [
        dict(kv_num_blocks=i32([[[3]]]), kv_indices=i32([[[[0, 0, 1]]]])),
        dict(kv_num_blocks=i32([[[1]]]), kv_indices=i32([[[[1, 0]]]]), full_kv_num_blocks=i32([[[1]]]),
             full_kv_indices=i32([[[[1, 0]]]])),
    ],
    ids=["twice_in_one_list", "in_both_lists"],
)
def test_a_key_block_listed_twice_for_a_query_block_is_refused(lists):
    """The kernel would count its keys twice: ``validate_layout`` and a launch on the CPU refuse it,
    naming the query block and the key block; a repeat past the count is never read, so it passes."""
    base = dict(full_kv_num_blocks=None, full_kv_indices=None, key_keep=None, block_q=16, block_k=8, q_len=16,
                kv_len=16)
    twice = r"query block \(0, 0, 0\) lists key block [01] more than once"
    layout = BlockLayout(**{**base, **lists})
    with pytest.raises(ValueError, match=twice):
        validate_layout(layout)
    q = k = v = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match=twice):
        sparse_attention(q, k, v, layout)
    unused_repeat = BlockLayout(**{**base, "kv_num_blocks": i32([[[2]]]), "kv_indices": i32([[[[0, 1, 0]]]])})
    validate_layout(unused_repeat)


def test_from_block_mask_rejects_a_mask_of_the_wrong_grid():
    with pytest.raises(ValueError, match=r"Q=2, K=3"):
        BlockLayout.from_block_mask(torch.ones(3, 3, dtype=torch.bool), block_q=8, block_k=8, q_len=16, kv_len=24)


def test_full_blocks_must_be_blocks_the_mask_visits():
    """``full`` marks which *visited* blocks need no element mask; marking a skipped one is refused."""
    with pytest.raises(ValueError, match=r"full marks block \(0, 0, 0, 1\) .* that blocks does not visit"):
        BlockLayout.from_block_mask(torch.tensor([[True, False], [True, True]]), block_q=16, block_k=16, q_len=20,
                                    kv_len=20, full=torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize("block_q", [0, -16, 16.0])
def test_layout_builders_name_a_block_size_that_is_not_a_positive_int(block_q):
    with pytest.raises(ValueError, match=f"block_q must be a positive int, got {block_q!r}"):
        BlockLayout.dense(block_q=block_q, block_k=16, q_len=20, kv_len=20)
    with pytest.raises(ValueError, match=f"block_q must be a positive int, got {block_q!r}"):
        BlockLayout.from_block_mask(torch.ones(2, 2, dtype=torch.bool), block_q=block_q, block_k=16, q_len=20, kv_len=20)


def test_a_layout_written_into_a_plan_slot_drives_planned_attention_like_the_kernel():
    g = torch.Generator().manual_seed(0)
    slot = Plan().slot_for(SlotSignature(1, 2, 24, 40, "cpu", 8, 8))
    blocks = torch.rand(1, 2, 3, 5, generator=g) < 0.5
    blocks[..., 0] = True
    layout = BlockLayout.from_block_mask(blocks, block_q=8, block_k=8, q_len=24, kv_len=40, full=blocks & (torch.rand(1, 2, 3, 5, generator=g) < 0.5))
    q, k, v = torch.randn(1, 2, 24, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    try:
        slot.set_layout(layout)
        got = planned_attention(q, k, v, None, *slot.tensors(), None, False, slot.id)
    finally:
        slot.clear()
    torch.testing.assert_close(got, sparse_attention(q, k, v, layout))
    assert not slot.fallbacks
