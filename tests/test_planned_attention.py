"""li::planned_attention and its plan slots: dense slots compute exactly SDPA, sparse slots compute
SDPA under the layout's token mask, misfits fall back to dense and say why, layouts are validated
and copied in place, and a compiled site follows the slot without recompiling."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import li_compile
from li_compile.plan import Plan, PlanSlot, SlotSignature, find_slot
from li_compile.planned_attention import planned_attention

FP32 = {"rtol": 1e-5, "atol": 1e-5}
BLOCK_Q, BLOCK_K = 4, 4


def make_slot(batch=2, heads=4, q_len=10, kv_len=13):
    return Plan().slot_for(SlotSignature(batch, heads, q_len, kv_len, "cpu", BLOCK_Q, BLOCK_K))


def qkv(batch=2, heads=4, kv_heads=4, q_len=10, kv_len=13, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, dim, generator=g),
        torch.randn(batch, kv_heads, kv_len, dim, generator=g),
        torch.randn(batch, kv_heads, kv_len, dim, generator=g),
    )


def call(slot, q, k, v, mask=None, scale=None, is_causal=False):
    return planned_attention(q, k, v, mask, *slot.tensors(), scale, is_causal, slot.id)


def random_layout(slot, seed=0, shared_heads=True, key_keep=None):
    """A layout (the BlockLayout fields) with random visited blocks, block 0 always visited."""
    s = slot.signature
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(1 if shared_heads else s.batch, 1 if shared_heads else s.heads, s.q_blocks, s.kv_blocks, generator=g) > 0.5
    blocks[..., 0] = True
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)  # visited block indices first
    layout = SimpleNamespace(
        kv_num_blocks=blocks.sum(-1).to(torch.int32),
        kv_indices=order.to(torch.int32),
        full_kv_num_blocks=None,
        full_kv_indices=None,
        key_keep=key_keep,
        block_q=s.block_q,
        block_k=s.block_k,
        q_len=s.q_len,
        kv_len=s.kv_len,
    )
    tokens = blocks.repeat_interleave(s.block_q, 2).repeat_interleave(s.block_k, 3)[..., : s.q_len, : s.kv_len]
    if key_keep is not None:
        tokens = tokens & key_keep[:, None, None, :]
    return layout, tokens


@pytest.mark.parametrize(
    "kw",
    [{}, {"scale": 0.3}, {"is_causal": True}, {"mask": "bool"}, {"mask": "float"}, {"kv_heads": 2}],
    ids=["plain", "scale", "causal", "bool_mask", "float_mask", "gqa"],
)
def test_a_dense_slot_computes_exactly_sdpa(kw):
    kw = dict(kw)
    q, k, v = qkv(kv_heads=kw.pop("kv_heads", 4))
    mask = {None: None, "bool": torch.rand(10, 13) > 0.3, "float": torch.randn(2, 1, 10, 13)}[kw.pop("mask", None)]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1], **kw)
    torch.testing.assert_close(call(make_slot(), q, k, v, mask, **kw), expected, **FP32)


@pytest.mark.parametrize("shared_heads", [True, False])
@pytest.mark.parametrize("site_mask", [None, "bool", "causal"])
def test_a_sparse_slot_computes_sdpa_under_the_layouts_token_mask(shared_heads, site_mask):
    slot, (q, k, v) = make_slot(), qkv()
    layout, tokens = random_layout(slot, shared_heads=shared_heads)
    slot.set_layout(layout)
    mask = torch.rand(10, 13) > 0.2 if site_mask == "bool" else None
    reference_mask = tokens & (mask if mask is not None else True)
    if site_mask == "causal":
        reference_mask = reference_mask & torch.ones(10, 13, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask)
    got = call(slot, q, k, v, mask, is_causal=site_mask == "causal")
    torch.testing.assert_close(got, expected, **FP32)
    assert not slot.fallbacks


def test_the_key_keep_vector_drops_exactly_those_keys():
    slot, (q, k, v) = make_slot(), qkv()
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 3:7] = False  # a dropped frame that does not align to blocks of 4
    keep[1, 11:] = False
    layout = SimpleNamespace(**{**vars(random_layout(slot)[0]), "key_keep": keep})
    layout.kv_num_blocks.fill_(slot.signature.kv_blocks)
    layout.kv_indices.copy_(torch.arange(slot.signature.kv_blocks, dtype=torch.int32))
    slot.set_layout(layout)
    for b in range(2):
        kept = keep[b]
        expected = F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, kept], v[b : b + 1, :, kept])
        torch.testing.assert_close(call(slot, q, k, v)[b : b + 1], expected, **FP32)


def test_clearing_a_slot_makes_it_dense_again():
    slot, (q, k, v) = make_slot(), qkv()
    slot.set_layout(random_layout(slot, seed=3)[0])
    assert not slot.is_dense
    slot.clear()
    assert slot.is_dense
    torch.testing.assert_close(call(slot, q, k, v), F.scaled_dot_product_attention(q, k, v), **FP32)


def test_a_slot_that_does_not_fit_the_call_runs_dense_and_counts_why():
    slot = make_slot()
    slot.set_layout(random_layout(slot)[0])
    q, k, v = qkv(q_len=7)  # not the slot's query length
    torch.testing.assert_close(call(slot, q, k, v), F.scaled_dot_product_attention(q, k, v), **FP32)
    ((reason, count),) = slot.fallbacks.items()
    assert count == 1 and "(B, H, Lq, Lk)=(2, 4, 7, 13)" in reason and "(2, 4, 10, 13)" in reason


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_q": 8}, "layout block_q is 8, slot .* needs 4"),
        ({"kv_len": 12}, "layout kv_len is 12"),
        ({"kv_num_blocks": torch.zeros(3, 1, 3, dtype=torch.int32)}, "kv_num_blocks axis 0 is 3, slot .* needs 2 or 1"),
        ({"kv_indices": torch.zeros(1, 1, 3, 9, dtype=torch.int32)}, "kv_indices capacity is 9, slot .* holds at most 4"),
        ({"key_keep": torch.ones(2, 13, 1, dtype=torch.bool)}, "key_keep must have 2 dims"),
    ],
)
def test_set_layout_rejects_a_layout_that_does_not_fit_and_leaves_the_slot_dense(change, message):
    slot = make_slot()
    layout = SimpleNamespace(**{**vars(random_layout(slot)[0]), **change})
    with pytest.raises(ValueError, match=message):
        slot.set_layout(layout)
    assert slot.is_dense


def test_a_call_that_needs_gradients_raises():
    slot, (q, k, v) = make_slot(), qkv()
    with pytest.raises(RuntimeError, match="inference-only"):
        call(slot, q.requires_grad_(), k, v)


def test_the_op_passes_torch_library_opcheck():
    slot, (q, k, v) = make_slot(), qkv(kv_heads=2)
    torch.library.opcheck(planned_attention, (q, k, v, torch.rand(10, 13) > 0.2, *slot.tensors(), 0.5, False, slot.id))


def test_slots_are_shared_by_signature_and_found_by_the_controller():
    plan = Plan()
    a = plan.slot_for(SlotSignature(1, 4, 16, 48, "cpu", 8, 8))
    assert plan.slot_for(SlotSignature(1, 4, 16, 48, "cpu", 8, 8)) is a
    b = plan.slot_for(SlotSignature(1, 4, 16, 16, "cpu", 8, 8))
    assert plan.slots_for(kv_len=48) == [a] and plan.slots_for(q_len=16) == [a, b]
    assert plan.slots_for(device="cpu") == [a, b] and plan.slots_for(heads=2) == []
    assert find_slot(a.id) is a
    gone = Plan().slot_for(SlotSignature(1, 4, 16, 48, "cpu", 8, 8)).id  # plan and slot dropped at once
    with pytest.raises(ValueError, match=f"no live plan slot {gone}"):
        find_slot(gone)
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        SlotSignature(1, 0, 16, 16, "cpu", 8, 8)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_a_compiled_site_follows_its_slot_in_place_without_recompiling(inner):
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q, k, v = qkv()
    compiled = torch.compile(attend, backend="light_interaction", options={"inner": inner, "sparsity": {"block_q": 16, "block_k": 16}})
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), **FP32)  # dense plan: eager
        (site,) = li_compile.report(compiled).compilations[-1].sites
        slot = find_slot(site.detail["slot"])
        assert (slot.signature.block_q, slot.signature.block_k) == (16, 16)
        with torch.compiler.set_stance("fail_on_recompile"):
            for seed in range(2):
                keep = torch.rand(2, 13, generator=torch.Generator().manual_seed(seed)) > 0.5
                keep[:, 0] = True
                layout, tokens = random_layout(slot, seed=seed, key_keep=keep)
                slot.set_layout(layout)
                expected = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens)
                torch.testing.assert_close(compiled(q, k, v), expected, **FP32)
            slot.clear()
            torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), **FP32)


@pytest.mark.parametrize("tiled", [False, True])
def test_density_below_one_keeps_each_query_blocks_own_tokens_behind_a_prefix_and_a_suffix(tiled):
    """A chunk's queries over prefix + context + chunk + suffix keys: the blocks top-k keeps for
    each query block's own position hold its own tokens (the chunk's, after the prefix and the
    context), in token order and in tile order (sinks at the end), not the keys' last tokens."""
    from li_compile.controller.attention_plan import mark_own_offset
    from li_compile.kernels.block_layout import BlockLayout
    from li_compile.planned_attention import _layout
    from li_compile.sequence import SequenceLayout
    from li_compile.tiled_sequence import TiledSequence

    sequence = SequenceLayout(2, 2, 8, 8, prefix_tokens=48, suffix_tokens=16, queries="chunk")
    slot = PlanSlot(SlotSignature(1, 1, sequence.q_len, sequence.kv_len, "cpu", 16, 16))
    mark_own_offset([slot], sequence)
    own_keys = sequence.frame_start(2) + torch.arange(sequence.q_len)  # each query's own token, token order
    if tiled:
        order = TiledSequence(sequence, (1, 4, 4))
        layout = BlockLayout.dense(block_q=16, block_k=16, q_len=sequence.q_len, kv_len=sequence.kv_len)
        slot.set_layout(layout, tiling=(order.query_perm, order.key_perm, order.query_inverse))
        own_keys = order.key_inverse[own_keys[order.query_perm]]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, sequence.q_len, 16, generator=g), torch.randn(1, 1, sequence.kv_len, 16, generator=g)
    visited = _layout(q, k, slot, 0.01).block_mask()[0, 0]
    rows = torch.arange(sequence.q_len) // 16
    assert visited[rows, own_keys // 16].all()


def test_density_below_one_follows_each_new_tile_order_even_when_python_reuses_an_id(monkeypatch):
    """Top-k's own blocks follow the slot's current tile order after it changes, also when the new
    order's tensor has the id() of one seen before (Python hands a freed object's id to the next:
    every object is given one id here, the worst case)."""
    import li_compile.planned_attention as planned
    from li_compile.controller.attention_plan import mark_own_offset
    from li_compile.kernels.block_layout import BlockLayout
    from li_compile.sequence import SequenceLayout
    from li_compile.tiled_sequence import TiledSequence

    monkeypatch.setattr(planned, "id", lambda obj: 0, raising=False)
    sequence = SequenceLayout(2, 2, 8, 8, prefix_tokens=16, queries="chunk")
    slot = PlanSlot(SlotSignature(1, 1, sequence.q_len, sequence.kv_len, "cpu", 16, 16))
    mark_own_offset([slot], sequence)
    layout = BlockLayout.dense(block_q=16, block_k=16, q_len=sequence.q_len, kv_len=sequence.kv_len)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, sequence.q_len, 16, generator=g), torch.randn(1, 1, sequence.kv_len, 16, generator=g)
    token_own = sequence.frame_start(2) + torch.arange(sequence.q_len)
    rows = torch.arange(sequence.q_len) // 16
    for sinks in ["end", "in_place", "end"]:  # the sinks moved: the chunk's keys sit 16 tokens apart
        order = TiledSequence(sequence, (1, 4, 4), sinks=sinks)
        slot.set_layout(layout, tiling=(order.query_perm, order.key_perm, order.query_inverse))
        own_keys = order.key_inverse[token_own[order.query_perm]]
        visited = planned._layout(q, k, slot, 0.01).block_mask()[0, 0]
        assert visited[rows, own_keys // 16].all(), sinks


def topk_reference_mask(slot, q, k, density, within):
    """The token mask that top-k selection inside ``within`` (a BlockLayout) should produce, built
    by brute force per row: the ceil(density * n) best pooled-score candidates plus the own blocks."""
    import math

    from li_compile.kernels.block_layout import BlockLayout
    from li_compile.kernels.tiling import own_blocks

    s = slot.signature
    pad_q, pad_k = s.q_blocks * s.block_q - s.q_len, s.kv_blocks * s.block_k - s.kv_len
    counts_q = torch.full((s.q_blocks,), float(s.block_q))
    counts_q[-1] = s.block_q - pad_q
    counts_k = torch.full((s.kv_blocks,), float(s.block_k))
    counts_k[-1] = s.block_k - pad_k
    pq = F.pad(q, (0, 0, 0, pad_q)).view(*q.shape[:2], s.q_blocks, s.block_q, -1).sum(3) / counts_q[:, None]
    pk = F.pad(k, (0, 0, 0, pad_k)).view(*k.shape[:2], s.kv_blocks, s.block_k, -1).sum(3) / counts_k[:, None]
    scores = pq @ pk.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)
    candidates = within.block_mask().expand_as(scores)
    own = own_blocks(s.q_len, s.kv_len, s.block_q, s.block_k)
    chosen = torch.zeros_like(candidates)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in scores.shape[:3])):
        b, h, r = idx.tolist()
        cand = candidates[b, h, r].nonzero().flatten()
        quota = max(1, math.ceil(density * len(cand)))
        best = cand[scores[b, h, r, cand].argsort(descending=True, stable=True)[:quota]]
        chosen[b, h, r, best] = True
        chosen[b, h, r] |= own[r] & candidates[b, h, r]
    refined = BlockLayout.from_block_mask(chosen, block_q=s.block_q, block_k=s.block_k, q_len=s.q_len,
                                          kv_len=s.kv_len, key_keep=within.key_keep)
    return refined.to_dense_mask()


@pytest.mark.parametrize("density", [0.25, 0.5])
@pytest.mark.parametrize("sparse_plan", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_density_below_one_visits_the_best_scoring_blocks_of_the_plan(density, sparse_plan, kv_heads):
    from li_compile.kernels.block_layout import BlockLayout

    slot, (q, k, v) = make_slot(q_len=13, kv_len=29), qkv(q_len=13, kv_len=29, kv_heads=kv_heads, seed=3)
    s = slot.signature
    if sparse_plan:
        layout, _ = random_layout(slot, seed=1)
        slot.set_layout(layout)
        within = BlockLayout(layout.kv_num_blocks, layout.kv_indices, None, None, None, s.block_q, s.block_k, s.q_len, s.kv_len)
    else:
        within = BlockLayout.dense(block_q=s.block_q, block_k=s.block_k, q_len=s.q_len, kv_len=s.kv_len)
    mask = topk_reference_mask(slot, q, k, density, within)
    assert mask.float().mean() < within.to_dense_mask().float().mean()  # it does drop blocks
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != 4)
    got = planned_attention(q, k, v, None, *slot.tensors(), None, False, slot.id, density)
    torch.testing.assert_close(got, expected, **FP32)
    assert not slot.fallbacks


def test_density_one_is_exactly_the_plan():
    slot, (q, k, v) = make_slot(), qkv()
    layout, tokens = random_layout(slot, seed=2)
    slot.set_layout(layout)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens)
    torch.testing.assert_close(planned_attention(q, k, v, None, *slot.tensors(), None, False, slot.id, 1.0), expected, **FP32)
