"""flex_attention calls are attention sites: with an identity score_mod they are rewritten to
li::planned_attention with their BlockMask as the site's mask (its block lists and mask_mod, with
FlexAttention's semantics), and match eager FlexAttention; the plan is intersected with that mask;
whatever cannot be rewritten exactly stays as written with the reason. Reference: eager
``flex_attention`` in fp32 (tolerance 1e-5)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import li_compile
from li_compile.kernels.block_layout import BlockLayout
from li_compile.passes import attention_flex
from li_compile.plan import find_slot

FP32 = {"rtol": 1e-5, "atol": 1e-5}


def qkv(heads=4, kv_heads=4, q_len=200, kv_len=300, dim=16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, kv_len, dim, generator=g),
            torch.randn(batch, kv_heads, kv_len, dim, generator=g))


def masked_sdpa(q, k, v, visible):
    """SDPA under the bool mask ``visible``; rows that see no key give zeros (as FlexAttention's)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return torch.where(visible.any(-1, keepdim=True), out, 0.0)


def causal(b, h, q, kv):
    return q >= kv


DOCUMENTS = torch.arange(300) // 70  # a captured tensor: FlexAttention passes it to the mask graph


def same_document(b, h, q, kv):
    return DOCUMENTS[q] == DOCUMENTS[kv]


def frame_causal(b, h, q, kv):  # a chunk of 64-token frames sees its own frame and earlier ones
    return q // 64 >= kv // 64


def per_head_window(b, h, q, kv):
    return (q - kv).abs() <= 24 * (h + 1) + 40 * b


LISTED = [[0, 4, 9], [], [1, 2], [5, 6, 7, 8]]  # key blocks (of 32) of each query block (of 64)


def hand_made_block_mask(q_len=200, kv_len=300):
    """A BlockMask from block lists with no mask_mod: query block 1 lists nothing (its rows see no key)."""
    counts = torch.tensor([[[len(listed) for listed in LISTED]]], dtype=torch.int32)
    indices = torch.zeros(1, 1, 4, 10, dtype=torch.int32)  # (B, H, query blocks, key blocks)
    for row, listed in enumerate(LISTED):
        indices[0, 0, row, :len(listed)] = torch.tensor(listed, dtype=torch.int32)
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(64, 32), seq_lengths=(q_len, kv_len))


def test_block_lists_without_a_mask_mod_are_honoured_as_compiled_flex_honours_them():
    """Eager ``flex_attention`` evaluates only ``mask_mod`` (here none: everything visible); compiled
    FlexAttention visits only the listed blocks. The rewrite follows the compiled semantics: the
    reference is SDPA under the listed blocks' token mask, written out here by hand."""
    q, k, v = qkv()
    visible = torch.zeros(200, 300, dtype=torch.bool)
    for row, listed in enumerate(LISTED):
        for block in listed:
            visible[64 * row:64 * (row + 1), 32 * block:32 * (block + 1)] = True
    expected = masked_sdpa(q, k, v, visible)
    _, compiled = compiled_flex(hand_made_block_mask())
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), expected, **FP32)
    (site,) = flex_sites(compiled)
    assert site.status == "rewritten"


CASES = {
    "causal_gqa_ragged": lambda: (create_block_mask(causal, None, None, 200, 300, device="cpu", BLOCK_SIZE=(64, 32)),
                                  dict(kv_heads=2), True),
    "captured_documents": lambda: (create_block_mask(same_document, None, None, 200, 300, device="cpu"), {}, False),
    "frame_causal": lambda: (create_block_mask(frame_causal, None, None, 256, 256, device="cpu", BLOCK_SIZE=64),
                             dict(q_len=256, kv_len=256), False),
    "per_batch_and_head": lambda: (create_block_mask(per_head_window, 2, 4, 200, 300, device="cpu", BLOCK_SIZE=32),
                                   dict(batch=2), False),
}


def compiled_flex(block_mask, gqa=False):
    def attend(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    return attend, torch.compile(attend, backend="light_interaction", options={"inner": "eager"})


def flex_sites(compiled):
    return [s for s in li_compile.report(compiled).sites if s.kind == "attention"]


def compiled_alike(attend):
    """``attend(q, k, v)`` compiled with light_interaction (eager inner) equals it run eagerly
    (fp32); returns its one flex site."""
    compiled = torch.compile(attend, backend="light_interaction", options={"inner": "eager"})
    q, k, v = qkv()
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), **FP32)
    (site,) = flex_sites(compiled)
    return site


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_flex_call_with_a_block_mask_is_rewritten_and_equals_eager_flex(case):
    block_mask, shapes, gqa = CASES[case]()
    q, k, v = qkv(**shapes)
    attend, compiled = compiled_flex(block_mask, gqa)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), **FP32)
    (site,) = flex_sites(compiled)
    assert site.status == "rewritten" and site.detail["spelling"] == "flex_attention"


def narrowing_window(b, h, q, kv):  # head 0 and batch 0 see the most
    return (q - kv).abs() <= 24 * (4 - h) + 40 * (1 - b)


def listed_tokens(num, idx, q_block, kv_block, q_len, kv_len):
    """(B|1, H|1, q_len, kv_len) bool: the tokens of the listed key blocks of each query block."""
    out = torch.zeros(*num.shape[:2], q_len, kv_len, dtype=torch.bool)
    for b, h, row in torch.cartesian_prod(*(torch.arange(n) for n in num.shape)).tolist():
        for block in idx[b, h, row, :num[b, h, row]].tolist():
            out[b, h, row * q_block:(row + 1) * q_block, block * kv_block:(block + 1) * kv_block] = True
    return out


@pytest.mark.parametrize("index", ["head", "batch"])
def test_a_block_mask_broadcast_over_heads_or_batch_calls_mask_mod_with_each_real_index(index):
    """``create_block_mask(mask_mod, B=None, H=None)`` lists blocks for batch 0 and head 0 only, but
    compiled FlexAttention calls ``mask_mod`` in the partial blocks with every real batch and query
    head index (diffusers' flex backend builds such masks). Reference: that semantics written out,
    SDPA under full blocks or partial blocks where ``mask_mod`` holds."""
    block_mask = create_block_mask(narrowing_window, None, None, 200, 300, device="cpu", BLOCK_SIZE=32)
    q, k, v = qkv(batch=2 if index == "batch" else 1)
    b, h = (torch.arange(n).view(*([1] * axis), n, *([1] * (3 - axis))) for axis, n in enumerate(q.shape[:2]))
    mod = narrowing_window(b, h, torch.arange(200).view(1, 1, 200, 1), torch.arange(300).view(1, 1, 1, 300))
    sizes = (32, 32, 200, 300)
    visible = (listed_tokens(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, *sizes)
               | (listed_tokens(block_mask.kv_num_blocks, block_mask.kv_indices, *sizes) & mod))
    _, compiled = compiled_flex(block_mask)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), masked_sdpa(q, k, v, visible), **FP32)
    (site,) = flex_sites(compiled)
    assert site.status == "rewritten"


def test_the_plan_is_intersected_with_the_block_mask_in_the_kernel():
    """A sparse plan on the rewritten site: the output is attention under both the user's mask and
    the plan (block-sparse kernel, interpreter), and at full plan density it equals eager flex."""
    block_mask = create_block_mask(same_document, None, None, 200, 300, device="cpu")
    q, k, v = qkv()
    attend, compiled = compiled_flex(block_mask)
    with torch.no_grad():
        compiled(q, k, v)
    (site,) = flex_sites(compiled)
    slot = find_slot(site.detail["slot"])
    s = slot.signature
    everything = torch.ones(1, 1, s.q_blocks, s.kv_blocks, dtype=torch.bool)
    slot.set_layout(BlockLayout.from_block_mask(everything, block_q=s.block_q, block_k=s.block_k, q_len=s.q_len,
                                                kv_len=s.kv_len))
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), **FP32)
    some = torch.rand(1, s.heads, s.q_blocks, s.kv_blocks, generator=torch.Generator().manual_seed(1)) < 0.5
    layout = BlockLayout.from_block_mask(some, block_q=s.block_q, block_k=s.block_k, q_len=s.q_len, kv_len=s.kv_len)
    slot.set_layout(layout)
    visible = layout.to_dense_mask() & (DOCUMENTS[:200, None] == DOCUMENTS[None, :300])
    expected = masked_sdpa(q, k, v, visible)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), expected, **FP32)
    assert not slot.fallbacks


def relative_bias(score, b, h, q, kv):
    return score + (q - kv) * 0.01


@pytest.mark.parametrize("variant, reason", [
    ("score_mod", "score_mod changes the scores"),
    ("lse", "log-sum-exp"),
    ("too_large", "mask elements"),
])
def test_a_flex_call_that_cannot_be_rewritten_exactly_runs_as_written_with_the_reason(variant, reason, monkeypatch):
    block_mask = create_block_mask(causal, None, None, 200, 300, device="cpu")
    if variant == "too_large":
        monkeypatch.setattr(attention_flex, "MAX_MASK_ELEMENTS", 1000)

    def attend(q, k, v):
        if variant == "score_mod":
            return flex_attention(q, k, v, score_mod=relative_bias, block_mask=block_mask)
        if variant == "lse":
            out, lse = flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
            return out * lse.exp()[..., None]
        return flex_attention(q, k, v, block_mask=block_mask)

    site = compiled_alike(attend)
    assert site.status == "skipped" and reason in site.reason, site.reason


def test_a_log_sum_exp_asked_for_but_never_read_does_not_block_the_rewrite():
    block_mask = create_block_mask(causal, None, None, 200, 300, device="cpu")

    def attend(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, return_lse=True)[0]

    assert compiled_alike(attend).status == "rewritten"


@pytest.mark.parametrize("write", ["copy_", "add_", "out="])
def test_a_log_sum_exp_written_into_a_buffer_is_read_and_keeps_the_call_as_written(write):
    block_mask = create_block_mask(causal, None, None, 200, 300, device="cpu")

    def attend(q, k, v, buffer):
        out, lse = flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
        if write == "copy_":
            buffer.copy_(lse)
        elif write == "add_":
            buffer.add_(lse)
        else:
            torch.exp(lse, out=buffer)
        return out

    compiled = torch.compile(attend, backend="light_interaction", options={"inner": "eager"})
    q, k, v = qkv()
    written, expected = torch.zeros(1, 4, 200), torch.zeros(1, 4, 200)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, written), attend(q, k, v, expected), **FP32)
    torch.testing.assert_close(written, expected, **FP32)
    (site,) = flex_sites(compiled)
    assert site.status == "skipped" and "log-sum-exp" in site.reason


def identity_score(score, b, h, q, kv):
    return score


@pytest.mark.parametrize("score_mod", [None, identity_score], ids=["plain", "identity_score_mod"])
def test_a_flex_call_without_a_block_mask_is_rewritten_as_unmasked_attention(score_mod):
    """Dynamo hands such a call FlexAttention's default block mask (one block of 2^30 tokens that
    masks nothing): the site is plain attention, rewritten with no mask to build."""
    def attend(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod)

    site = compiled_alike(attend)
    assert site.status == "rewritten" and site.detail["masks"] == 0


def test_a_mask_mod_on_blocks_larger_than_the_sequence_expands_to_no_more_than_the_token_mask():
    """A block mask of one 2^30-token block with a causal ``mask_mod``: the token mask is built per
    token (never block size x block size), so the rewritten site runs and equals eager flex."""
    huge = BlockMask.from_kv_blocks(torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32),
                                    BLOCK_SIZE=1 << 30, mask_mod=causal)
    q, k, v = qkv()
    attend, compiled = compiled_flex(huge)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), **FP32)
    (site,) = flex_sites(compiled)
    assert site.status == "rewritten" and site.detail["masks"] == 1
