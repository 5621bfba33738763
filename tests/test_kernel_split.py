"""The split path (dense span through flash, the rest through the Triton kernel, merged by
log-sum-exp) computes masked dense attention, and its guards hold.

Reference: fp32 SDPA under ``layout.to_dense_mask()`` OR every key of the span (AND the site and
causal masks); rows that see no key are zeros. Runs in the Triton interpreter on CPU, where the
span's flash partial is torch's CPU flash kernel (the same aten contract as CUDA's: output and
natural-log log-sum-exp)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import li_compile.kernels.block_sparse_attention as bsa
import li_compile.kernels.split_attention as split
from li_compile.kernels.block_layout import BlockLayout, cdiv, validate_layout
from li_compile.kernels.split_attention import chunk_span, split_attention, split_layout, split_path

from test_kernel import TOLERANCE, qkv, random_layout

BF16_RELATIVE = 2e-2  # bf16 rounding of inputs and output, against the fp32 reference


def span_mask(q_len, kv_len, block_k, span, device="cpu"):
    keys = torch.zeros(kv_len, dtype=torch.bool, device=device)
    keys[span[0] * block_k : span[1] * block_k] = True
    return keys.expand(q_len, kv_len)


def reference(q, k, v, layout, span, attn_mask=None, is_causal=False, scale=None):
    """fp32 SDPA under (layout mask | span) & site mask & causal mask; empty rows -> 0."""
    visible = layout.to_dense_mask() | span_mask(q.shape[2], k.shape[2], layout.block_k, span, q.device)
    visible = visible.expand(q.shape[0], q.shape[1], -1, -1)
    if attn_mask is not None:
        visible = visible & attn_mask
    if is_causal:
        visible = visible & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=visible, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return torch.where(visible.any(-1, keepdim=True), out, 0.0)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 90),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    blocks=st.sampled_from([(16, 16), (8, 16), (32, 8)]),
    shared=st.booleans(),
    drop_span=st.booleans(),
    data=st.data(),
)
def test_merged_result_equals_masked_dense_attention(batch, kv_heads, group, q_len, kv_len, dtype, blocks, shared, drop_span, data):
    """Any span, GQA, ragged lengths, fp32/fp16; the layout may list the span's blocks or not."""
    heads = kv_heads * group
    seed = data.draw(st.integers(0, 2**16))
    kv_blocks = cdiv(kv_len, blocks[1])
    first = data.draw(st.integers(0, kv_blocks))
    span = (first, data.draw(st.integers(first, kv_blocks)))
    g = torch.Generator().manual_seed(seed)
    q, k, v = qkv(batch, heads, kv_heads, q_len, kv_len, 16, dtype, seed=seed)
    layout = random_layout(g, batch, heads, q_len, kv_len, *blocks, shared=shared)
    if drop_span:
        layout = split_layout(layout, span)
    out = split_attention(q, k, v, layout, span)
    assert out.dtype == dtype and out.shape == (batch, heads, q_len, 16) and out.is_contiguous()
    torch.testing.assert_close(out.float(), reference(q, k, v, layout, span), **TOLERANCE[dtype])


@pytest.mark.parametrize("mask_kind", ["bool", "causal"])
def test_a_site_or_causal_mask_applies_to_the_span_too(mask_kind):
    """flash takes no mask here: the Triton kernel visits the span itself, under the masks."""
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv(2, 4, 2, 40, 72, 16, torch.float32)
    layout = random_layout(g, 2, 4, 40, 72, 8, 16)
    mask = torch.rand(2, 1, 40, 72, generator=g) < 0.7 if mask_kind == "bool" else None
    span = (2, 5)
    out = split_attention(q, k, v, layout, span, attn_mask=mask, is_causal=mask_kind == "causal")
    expected = reference(q, k, v, layout, span, mask, mask_kind == "causal")
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    assert "in-kernel" in split_path(q, k, v, layout, span, attn_mask=mask, is_causal=mask_kind == "causal")


def test_rows_that_see_no_key_are_zero_not_nan():
    q, k, v = qkv(1, 2, 2, 20, 40, 16, torch.float32)
    blocks = torch.tensor([[True, False, False], [False, False, False]])  # query block 1 visits nothing
    layout = BlockLayout.from_block_mask(blocks, block_q=16, block_k=16, q_len=20, kv_len=40)
    out = split_attention(q, k, v, layout, (3, 3))
    assert out.isfinite().all() and (out[:, :, 16:] == 0).all()
    # a seed from flash whose rows saw nothing (lse = -inf) plus no visible block: zeros as well
    lse = torch.full((1, 2, 1, 20), float("-inf"))
    seed_o = torch.zeros(1, 2, 1, 20, 16)
    empty = BlockLayout.from_block_mask(torch.zeros(2, 3, dtype=torch.bool), block_q=16, block_k=16, q_len=20, kv_len=40)
    out = bsa.launch_split(q, k, v, empty.kv_num_blocks, empty.kv_indices, None, None, None, None, 16, 16, None, False,
                           span=(0, 1), seed=(seed_o, lse))
    assert out.isfinite().all() and (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_density_one_is_exactly_sdpa(dtype):
    """A span of every key is dense attention: SDPA's own call (no log-sum-exp asked for), bit for bit."""
    q, k, v = qkv(1, 4, 2, 48, 96, 32, dtype)
    layout = BlockLayout.dense(block_q=16, block_k=16, q_len=48, kv_len=96)
    span = (0, layout.kv_blocks)
    assert split_path(q, k, v, layout, span) == "sdpa"
    assert torch.equal(split_attention(q, k, v, layout, span), F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(split_attention(q, k, v, layout, span).float(), expected, **TOLERANCE[dtype])


def test_the_chunks_own_keys_go_through_flash_and_the_rest_through_triton():
    q_len, kv_len = 40, 130
    span = chunk_span(q_len, kv_len, 16)
    assert span == (6, 9)  # keys 96..129 (block 5 holds keys 80..95, partly before the chunk)
    q, k, v = qkv(1, 2, 1, q_len, kv_len, 16, torch.float32)
    layout = split_layout(random_layout(torch.Generator().manual_seed(2), 1, 2, q_len, kv_len, 8, 16), span)
    assert split_path(q, k, v, layout, span) == "cpu_flash + triton"
    torch.testing.assert_close(split_attention(q, k, v, layout, span), reference(q, k, v, layout, span),
                               **TOLERANCE[torch.float32])


def test_a_span_too_short_for_flash_to_pay_is_visited_in_the_kernel(monkeypatch):
    """On the GPU a span whose work is under MIN_FLASH_SPAN_WORK skips flash (its extra launch and
    partial cost more than it saves); the result is the same attention. Here the CPU takes the GPU's rule."""
    from li_compile.kernels import split_attention as split
    monkeypatch.setattr(split, "SHORT_SPAN_DEVICES", ("cpu",))
    monkeypatch.setattr(split, "MIN_FLASH_SPAN_WORK", 2 * 40 * 16 * 48)  # q (1, 2, 40, 16): 48 keys
    q, k, v = qkv(1, 2, 1, 40, 130, 16, torch.float32)
    layout = random_layout(torch.Generator().manual_seed(4), 1, 2, 40, 130, 8, 16)
    assert split_path(q, k, v, layout, (6, 9)) == "triton (span in-kernel: a span of 34 keys, 4.4e+04 multiply-adds, under 6.1e+04)"
    torch.testing.assert_close(split_attention(q, k, v, layout, (6, 9)), reference(q, k, v, layout, (6, 9)),
                               **TOLERANCE[torch.float32])
    assert split_path(q, k, v, layout, (5, 9)) == "cpu_flash + triton"  # 50 keys: flash runs them


def test_head_dims_that_differ_visit_the_span_in_the_kernel():
    q, k, v = qkv(1, 2, 2, 24, 64, 32, torch.float32, dim_v=16)
    layout = random_layout(torch.Generator().manual_seed(3), 1, 2, 24, 64, 8, 16)
    assert "in-kernel" in split_path(q, k, v, layout, (1, 3))
    torch.testing.assert_close(split_attention(q, k, v, layout, (1, 3)), reference(q, k, v, layout, (1, 3)),
                               **TOLERANCE[torch.float32])


def test_split_layout_drops_exactly_the_span_blocks():
    layout = random_layout(torch.Generator().manual_seed(4), 2, 3, 40, 100, 8, 16)
    rest = split_layout(layout, (2, 5))
    expected = layout.block_mask().clone()
    expected[..., 2:5] = False
    assert torch.equal(rest.block_mask(), expected)
    assert rest.capacity == layout.capacity
    validate_layout(rest, dense_span=(2, 5))
    with pytest.raises(ValueError, match=r"inside the dense span \(2, 5\)"):
        validate_layout(layout, dense_span=(2, 5))


def test_bf16_in_the_interpreter_is_computed_in_fp32_not_garbage():
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 1, 32, 64, 16, torch.bfloat16)
    layout = random_layout(g, 1, 2, 32, 64, 16, 16)
    for span in ((0, 0), (2, 4)):
        out = split_attention(q, k, v, layout, span)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, reference(q, k, v, layout, span)) < BF16_RELATIVE
    assert rel_err(bsa.sparse_attention(q, k, v, layout), reference(q, k, v, layout, (0, 0))) < BF16_RELATIVE


@pytest.mark.parametrize(
    "counts, index, match",
    [
        (2, 1_000_000, r"kv_indices lists key block 1000000, expected indices in \[0, kv_blocks=4\)"),
        (2, -1, r"kv_indices lists key block -1, expected"),
        (-3, 0, r"kv_num_blocks holds -3, expected counts in \[0, capacity=4\]"),
        (9, 0, r"kv_num_blocks holds 9, expected counts in \[0, capacity=4\]"),
    ],
    ids=["index_too_large", "index_negative", "count_negative", "count_over_capacity"],
)
def test_bad_index_values_raise_naming_the_value_and_the_range(counts, index, match):
    num = torch.full((1, 1, 2), counts, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 4, dtype=torch.int32)
    idx[..., 1] = index
    with pytest.raises(ValueError, match=match):
        BlockLayout(num, idx, None, None, None, block_q=16, block_k=16, q_len=32, kv_len=64)
    q, k, v = qkv(1, 1, 1, 32, 64, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        torch.ops.li.split_attention(q, k, v, num, idx, None, None, None, None, 16, 16, None, False, 0, 0)


def test_the_kernel_skips_what_the_check_refuses_and_never_reads_out_of_bounds(monkeypatch):
    """With the value check switched off (a GPU does not run it per call), bad counts are clamped to
    [0, capacity] and bad indices skipped: the result is the good entries' attention."""
    monkeypatch.setattr(bsa, "validate_indices", lambda *args, **kwargs: None)
    monkeypatch.setattr(bsa, "validate_unique", lambda *args, **kwargs: None)
    q, k, v = qkv(1, 1, 1, 32, 64, 16, torch.float32)
    num = torch.tensor([[[9, -3]]], dtype=torch.int32)  # over capacity, negative
    idx = torch.tensor([[[[1, 1_000_000, -7, 3], [0, 0, 0, 0]]]], dtype=torch.int32)
    out = bsa.launch(q, k, v, num, idx, None, None, None, None, 16, 16, None, False)
    good = BlockLayout.from_block_mask(torch.tensor([[False, True, False, True], [False] * 4]),
                                       block_q=16, block_k=16, q_len=32, kv_len=64)
    torch.testing.assert_close(out, reference(q, k, v, good, (0, 0)), **TOLERANCE[torch.float32])


class _CopyWatch(TorchDispatchMode):
    """Records every aten op that reads q, k or v's storage without returning a view of it."""

    def __init__(self, watched, readers_allowed):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}
        self.readers_allowed = readers_allowed
        self.copies, self.largest_new = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        out_storages = {o.untyped_storage().data_ptr() for o in flat_out}
        reads = any(a.untyped_storage().data_ptr() in self.storages for a in flat_in)
        if reads and not out_storages & self.storages and func not in self.readers_allowed:
            self.copies.append(str(func))
        for o in flat_out:
            if o.untyped_storage().data_ptr() not in self.storages:
                self.largest_new = max(self.largest_new, o.numel())
        return out


def _as_specialised(call: bsa.KernelCall) -> tuple:
    """What Triton builds a launch by: its flags, and per argument a tensor's dtype, shape and strides
    or a scalar's value (``BUCKET_SCALARS`` included: the calls compared here have equal lengths)."""
    args = tuple((t.dtype, tuple(t.shape), t.stride()) if isinstance(t, torch.Tensor) else t for t in call.args)
    return call.flags, args, call.key


@pytest.mark.parametrize("span", [(0, 0), (2, 4)], ids=["no span (HY full)", "flash-seeded span (Matrix-Game)"])
def test_a_padded_call_prepares_the_launch_its_unpadded_context_makes(monkeypatch, span):
    """A key-padding mask (a model's padded capacity bucket) names, as its sibling, the launch the
    same site makes without the mask (the full context): the same flags and arguments as Triton
    specialises them, so that the first tuning can build its code path too. Without a mask there is
    no sibling; a span that flash would run under no mask comes with flash's partial (so the sibling
    is the seeded path, where the padded call visits its span in the kernel)."""
    launches = []
    real = split.launch_split

    def spy(*args, **kwargs):
        launches.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(split, "launch_split", spy)
    q, k, v = qkv(1, 2, 2, 32, 64, 16, torch.float32)
    layout = split_layout(random_layout(torch.Generator().manual_seed(12), 1, 2, 32, 64, 16, 16), span)
    padding = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    padding[..., :8] = False
    padded = split_attention(q, k, v, layout, span, attn_mask=padding)
    torch.testing.assert_close(padded, reference(q, k, v, layout, span, padding), **TOLERANCE[torch.float32])
    (_, kwargs), = launches
    assert kwargs["seed"] is None
    sibling, = kwargs["siblings"]()
    launches.clear()
    split_attention(q, k, v, layout, span)
    (args, kwargs), = launches
    assert kwargs["siblings"] is None
    assert (kwargs["seed"] is not None) == (span != (0, 0))
    unpadded = bsa.prepare_call(*args, span=kwargs["span"], seed=kwargs["seed"])
    assert _as_specialised(sibling) == _as_specialised(unpadded)


def test_the_merge_makes_no_copy_of_q_k_or_v(monkeypatch):
    """Every op of the split path that touches q, k or v either returns a view of it or is the flash
    kernel itself, the Triton kernel is handed q, k and v's own memory, and nothing allocated is
    larger than the output (flash's partial output is output-sized; its lse one value per row)."""
    handed = {}

    def kernel(q, k, v, *args, **kwargs):
        handed.update(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), seed=kwargs["seed"] is not None)
        return torch.empty(q.shape, dtype=q.dtype)  # the real launcher allocates the output like this

    monkeypatch.setattr(split, "launch_split", kernel)
    q, k, v = qkv(1, 4, 2, 24, 96, 16, torch.float16)  # GQA: flash reads q's grouped heads as a view
    layout = split_layout(random_layout(torch.Generator().manual_seed(6), 1, 4, 24, 96, 8, 16), (3, 6))
    flash = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
    with _CopyWatch((q, k, v), flash) as watch:
        split_attention(q, k, v, layout, (3, 6))
    assert handed == dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), seed=True)
    assert watch.copies == []
    assert watch.largest_new <= q.numel()  # the output's size (D == Dv here); K/V are 2x larger


def test_compiles_fullgraph_and_matches_eager():
    q, k, v = qkv(1, 2, 1, 16, 48, 16, torch.float32)
    layout = split_layout(random_layout(torch.Generator().manual_seed(7), 1, 2, 16, 48, 16, 16), (2, 3))
    tensors = (layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices, layout.key_keep)

    def attend(q, k, v, num, idx, full_num, full_idx, keep):
        return torch.ops.li.split_attention(q, k, v, num, idx, full_num, full_idx, keep, None, 16, 16, None, False, 2, 3) * 2

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, *tensors), attend(q, k, v, *tensors))


def test_the_op_passes_opcheck_and_refuses_gradients():
    q, k, v = qkv(1, 2, 1, 8, 32, 16, torch.float32)
    layout = random_layout(torch.Generator().manual_seed(8), 1, 2, 8, 32, 8, 8)
    args = (q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
            layout.key_keep, None, 8, 8, None, False, 2, 4)
    torch.library.opcheck(torch.ops.li.split_attention.default, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="inference-only"):
        split_attention(q.requires_grad_(), k, v, layout, (2, 4))


def test_a_span_outside_the_keys_is_refused():
    q, k, v = qkv(1, 1, 1, 8, 32, 16, torch.float32)
    layout = BlockLayout.dense(block_q=8, block_k=8, q_len=8, kv_len=32)
    with pytest.raises(ValueError, match=r"0 <= first <= end <= 4, got \(2, 5\)"):
        split_attention(q, k, v, layout, (2, 5))


@pytest.mark.parametrize("span", [(0, 0), (1, 2)], ids=["kernel_alone", "with_span"])
@pytest.mark.parametrize("strided", ["key_keep", "kv_indices", "full_kv_indices"])
def test_layout_tensors_whose_last_dim_is_not_contiguous_give_the_same_attention(strided, span):
    """The kernel reads index rows and the keep vector with unit stride: a transposed view of the same
    values must give what its contiguous copy gives."""
    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(1, 1, 1, 64, 64, 16, torch.float32)
    layout = random_layout(g, 1, 1, 64, 64, 16, 16)
    fields = {"key_keep": layout.key_keep, "kv_indices": layout.kv_indices, "full_kv_indices": layout.full_kv_indices}
    values = fields[strided]
    fields[strided] = torch.stack([values, values], -1)[..., 0]  # the same values, every other element
    assert torch.equal(fields[strided], values) and fields[strided].stride(-1) != 1
    strided_layout = BlockLayout(layout.kv_num_blocks, fields["kv_indices"], layout.full_kv_num_blocks,
                                 fields["full_kv_indices"], fields["key_keep"], 16, 16, 64, 64)
    torch.testing.assert_close(split_attention(q, k, v, strided_layout, span), reference(q, k, v, layout, span),
                               **TOLERANCE[torch.float32])


def test_a_span_over_every_key_still_checks_the_layout_and_block_sizes():
    """That route runs SDPA alone and never reads the layout, but a malformed layout or block size is
    still refused, naming it, as on every other route."""
    q, k, v = qkv(1, 1, 1, 32, 32, 16, torch.float32)
    layout = BlockLayout.dense(block_q=16, block_k=16, q_len=32, kv_len=32)
    op = torch.ops.li.split_attention
    with pytest.raises(ValueError, match="kv_indices must be int32"):
        op(q, k, v, layout.kv_num_blocks, layout.kv_indices.long(), None, None, None, None, 16, 16, None, False, 0, 2)
    with pytest.raises(ValueError, match="key_keep must be bool"):
        op(q, k, v, layout.kv_num_blocks, layout.kv_indices, None, None, torch.ones(1, 7, dtype=torch.bool), None,
           16, 16, None, False, 0, 2)
    with pytest.raises(ValueError, match="block_q must be a positive int, got 0"):
        op(q, k, v, layout.kv_num_blocks, layout.kv_indices, None, None, None, None, 0, 16, None, False, 0, 2)
    with pytest.raises(ValueError, match="block_k must be a positive int, got -16"):
        op(q, k, v, layout.kv_num_blocks, layout.kv_indices, None, None, None, None, 16, -16, None, False, 0, 1)


def test_a_fractional_span_or_a_tensor_scale_is_refused_naming_it():
    q, k, v = qkv(1, 1, 1, 32, 32, 16, torch.float32)
    layout = BlockLayout.dense(block_q=16, block_k=16, q_len=32, kv_len=32)
    with pytest.raises(ValueError, match=r"int key blocks .* got \(0.5, 1.9\)"):
        split_attention(q, k, v, layout, (0.5, 1.9))
    with pytest.raises(ValueError, match="scale must be None or a finite number"):
        bsa.sparse_attention(q, k, v, layout, scale=torch.tensor(0.5))


@pytest.mark.parametrize("kv_len", [64, 70], ids=["whole_blocks", "ragged"])
def test_the_tma_variant_computes_the_same_attention(monkeypatch, kv_len):
    """Hopper's descriptor loads (``USE_TMA``), run by the interpreter: same result as pointer loads,
    ragged keys read as zeros past Lk, and the seeded merge unchanged."""
    kernels = bsa._kernels()
    monkeypatch.setattr(bsa, "_kernels", lambda: bsa._Kernels(kernels.fixed, kernels.fixed, kernels.fixed, None))
    launches = []
    launch_tma = bsa._launch_tma
    monkeypatch.setattr(bsa, "_launch_tma", lambda *args: launches.append(args[3]["USE_TMA"]) or launch_tma(*args))
    q, k, v = qkv(1, 4, 2, 40, kv_len, 16, torch.float32)
    layout = split_layout(random_layout(torch.Generator().manual_seed(9), 1, 4, 40, kv_len, 8, 16, with_keep=False), (1, 3))
    assert bsa._tma_eligible(q, k, v, {"EVEN_D": True})
    for span in ((0, 0), (1, 3)):
        torch.testing.assert_close(split_attention(q, k, v, layout, span), reference(q, k, v, layout, span),
                                   **TOLERANCE[torch.float32])
    assert launches == [True, True]
