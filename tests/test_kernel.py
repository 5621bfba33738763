"""The fused block-sparse attention kernel computes dense attention under the layout's expanded mask.

Reference: SDPA in fp32 (inputs upcast) with the bool mask ``layout.to_dense_mask()`` combined with the
site mask and the causal mask; rows that see no key are zeros. Runs in the Triton interpreter on CPU
(bf16 arithmetic is not trusted there: bf16 is covered by benchmarks/attention.py on the GPU)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from li_compile.kernels.block_layout import BlockLayout, cdiv
from li_compile.kernels.block_sparse_attention import UnsupportedAttention, launch, sparse_attention

TOLERANCE = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


def qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype, dim_v=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, dim, generator=g).to(dtype),
        torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype),
        torch.randn(batch, kv_heads, kv_len, dim_v or dim, generator=g).to(dtype),
    )


def random_layout(g, batch, heads, q_len, kv_len, block_q, block_k, shared=False, with_full=True, with_keep=True):
    q_blocks, kv_blocks = cdiv(q_len, block_q), cdiv(kv_len, block_k)
    lead = (1, 1) if shared else (batch, heads)
    blocks = torch.rand(*lead, q_blocks, kv_blocks, generator=g) < 0.6
    full = blocks & (torch.rand(*lead, q_blocks, kv_blocks, generator=g) < 0.5) if with_full else None
    keep = torch.rand(batch, kv_len, generator=g) < 0.7 if with_keep else None
    return BlockLayout.from_block_mask(
        blocks, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, full=full, key_keep=keep
    )


def reference(q, k, v, layout, attn_mask=None, is_causal=False, scale=None):
    """fp32 SDPA under the expanded layout mask, the site mask and the causal mask; empty rows -> 0."""
    visible = layout.to_dense_mask().expand(q.shape[0], q.shape[1], -1, -1)
    bias = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        bias = attn_mask.float()
    if is_causal:
        visible = visible & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    mask = visible if bias is None else bias.masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return torch.where(visible.any(-1, keepdim=True), out, 0.0)


def site_mask(kind, g, batch, heads, q_len, kv_len, dtype):
    if kind == "bool":
        return torch.rand(batch, 1, q_len, kv_len, generator=g) < 0.8
    if kind == "additive":
        return torch.randn(1, heads, q_len, kv_len, generator=g).to(dtype)
    if kind == "key_padding":
        return torch.rand(batch, 1, 1, kv_len, generator=g) < 0.8
    return None


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 70),
    dim=st.sampled_from([16, 32, 24]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    blocks=st.sampled_from([(16, 16), (8, 16), (16, 32), (32, 8)]),
    shared=st.booleans(),
    with_full=st.booleans(),
    with_keep=st.booleans(),
    mask_kind=st.sampled_from([None, "bool", "additive", "key_padding"]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_sdpa_under_the_expanded_layout_mask(
    batch, kv_heads, group, q_len, kv_len, dim, dtype, blocks, shared, with_full, with_keep, mask_kind, is_causal, seed
):
    heads = kv_heads * group
    g = torch.Generator().manual_seed(seed)
    q, k, v = qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype, seed=seed)
    layout = random_layout(g, batch, heads, q_len, kv_len, *blocks, shared=shared, with_full=with_full, with_keep=with_keep)
    mask = site_mask(mask_kind, g, batch, heads, q_len, kv_len, dtype)
    out = sparse_attention(q, k, v, layout, attn_mask=mask, is_causal=is_causal)
    assert out.dtype == dtype and out.shape == (batch, heads, q_len, dim)
    torch.testing.assert_close(out.float(), reference(q, k, v, layout, mask, is_causal), **TOLERANCE[dtype])


def test_blocks_the_layout_does_not_list_are_never_read():
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv(1, 2, 2, 32, 64, 16, torch.float32)
    layout = random_layout(g, 1, 2, 32, 64, 16, 16, with_keep=False)
    unvisited = ~layout.block_mask().repeat_interleave(16, -1).any(-2)  # (1, 2, 64) keys no query block visits
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[unvisited] = float("nan")
    v_poisoned[unvisited] = float("nan")
    out = sparse_attention(q, k_poisoned, v_poisoned, layout)
    assert unvisited.any() and out.isfinite().all()
    torch.testing.assert_close(out, reference(q, k, v, layout), **TOLERANCE[torch.float32])


def test_rows_that_see_no_key_are_zero_not_nan():
    q, k, v = qkv(1, 1, 1, 20, 20, 16, torch.float32)
    blocks = torch.tensor([[True, False], [False, False]])  # the second query block visits nothing
    layout = BlockLayout.from_block_mask(blocks, block_q=16, block_k=16, q_len=20, kv_len=20)
    out = sparse_attention(q, k, v, layout)
    assert out.isfinite().all() and (out[:, :, 16:] == 0).all()
    masked = torch.zeros(20, 20, dtype=torch.bool)  # and a site mask that hides every key from row 3
    masked[:, :16] = True
    masked[3] = False
    out = sparse_attention(q, k, v, layout, attn_mask=masked)
    assert (out[:, :, 3] == 0).all() and out.isfinite().all()


def test_full_blocks_skip_the_key_keep_vector():
    q, k, v = qkv(1, 1, 1, 16, 32, 16, torch.float32)
    blocks = torch.ones(1, 2, dtype=torch.bool)
    full = torch.tensor([[True, False]])
    keep = torch.zeros(1, 32, dtype=torch.bool)
    keep[0, 20:] = True
    layout = BlockLayout.from_block_mask(blocks, block_q=16, block_k=16, q_len=16, kv_len=32, full=full, key_keep=keep)
    seen = torch.cat([torch.ones(16, dtype=torch.bool), keep[0, 16:]])
    expected = F.scaled_dot_product_attention(q, k[:, :, seen], v[:, :, seen])
    torch.testing.assert_close(sparse_attention(q, k, v, layout), expected, **TOLERANCE[torch.float32])


def test_key_padding_fast_path_equals_the_general_mask_path():
    g = torch.Generator().manual_seed(2)
    q, k, v = qkv(2, 2, 2, 24, 40, 16, torch.float32)
    layout = random_layout(g, 2, 2, 24, 40, 8, 16)
    padding = torch.rand(2, 1, 1, 40, generator=g) < 0.7
    fast = sparse_attention(q, k, v, layout, attn_mask=padding)
    general = sparse_attention(q, k, v, layout, attn_mask=padding.expand(2, 1, 24, 40).contiguous())
    torch.testing.assert_close(fast, general, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dim, dim_v", [(64, 64), (128, 128), (40, 40), (16, 48)], ids=["d64", "d128", "d40", "dv48"])
def test_head_dims_including_padded_and_a_different_value_dim(dim, dim_v):
    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(1, 2, 1, 16, 48, dim, torch.float16, dim_v=dim_v)
    layout = random_layout(g, 1, 2, 16, 48, 16, 16)
    out = sparse_attention(q, k, v, layout, scale=0.2)
    assert out.shape == (1, 2, 16, dim_v)
    torch.testing.assert_close(out.float(), reference(q, k, v, layout, scale=0.2), **TOLERANCE[torch.float16])


@pytest.mark.parametrize("scale", [0.3, 0.0, -0.3])
def test_any_scale_sign_on_the_unmasked_fast_path(scale):
    # whole blocks, no keep vector, no site mask: the kernel folds a positive scale into exp2's
    # multiply-add and must not fold a zero or negative one (the row max would be wrong)
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 2, 32, 64, 16, torch.float32)
    q = q * 50  # logits spread over hundreds: a wrong row max overflows exp2
    layout = random_layout(g, 1, 2, 32, 64, 16, 16, with_keep=False)
    out = sparse_attention(q, k, v, layout, scale=scale)
    torch.testing.assert_close(out, reference(q, k, v, layout, scale=scale), **TOLERANCE[torch.float32])


def test_block_sizes_that_are_not_powers_of_two():
    g = torch.Generator().manual_seed(4)
    q, k, v = qkv(1, 1, 1, 30, 41, 16, torch.float32)
    layout = random_layout(g, 1, 1, 30, 41, 12, 12)
    torch.testing.assert_close(sparse_attention(q, k, v, layout), reference(q, k, v, layout), **TOLERANCE[torch.float32])


def test_compiles_fullgraph_and_matches_eager():
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 2, 16, 32, 16, torch.float32)
    layout = random_layout(g, 1, 2, 16, 32, 16, 16)

    def attend(q, k, v, num, idx, full_num, full_idx, keep):
        return torch.ops.li.block_sparse_attention(q, k, v, num, idx, full_num, full_idx, keep, None, 16, 16, None, False) * 2

    tensors = (layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices, layout.key_keep)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, *tensors), attend(q, k, v, *tensors))


def test_the_op_passes_opcheck():
    g = torch.Generator().manual_seed(6)
    q, k, v = qkv(1, 2, 1, 8, 16, 16, torch.float32)
    layout = random_layout(g, 1, 2, 8, 16, 8, 8)
    args = (q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
            layout.key_keep, None, 8, 8, None, True)
    torch.library.opcheck(torch.ops.li.block_sparse_attention.default, args, test_utils=("test_schema", "test_faketensor"))


def test_gradients_are_refused_with_a_clear_error():
    q, k, v = qkv(1, 1, 1, 8, 8, 16, torch.float32)
    layout = BlockLayout.dense(block_q=8, block_k=8, q_len=8, kv_len=8)
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse_attention(q.requires_grad_(), k, v, layout)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "must divide"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), "do not match"),
        (((1, 2, 8, 512), (1, 2, 8, 512), (1, 2, 8, 512)), "head dims"),
        (((1, 0, 8, 16), (1, 0, 8, 16), (1, 0, 8, 16)), r"at least one head .* got q \(1, 0, 8, 16\)"),
        (((1, 2, 8, 0), (1, 2, 8, 0), (1, 2, 8, 16)), r"a head dim >= 1, got q \(1, 2, 8, 0\)"),
    ],
    ids=["gqa_heads", "head_dim", "too_wide", "no_heads", "empty_head_dim"],
)
def test_unsupported_calls_raise_naming_the_problem(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes)
    layout = BlockLayout.dense(block_q=8, block_k=8, q_len=8, kv_len=8)
    with pytest.raises(UnsupportedAttention, match=match):
        sparse_attention(q, k, v, layout)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(3, 1, 1, 8, dtype=torch.bool), r"attn_mask \(3, 1, 1, 8\) does not broadcast to \(B, H, Lq, Lk\)=\(2, 2, 8, 8\)"),
        (torch.ones(1, 1, 8, 8, dtype=torch.int64), r"attn_mask must be bool .* or floating .*, got torch.int64"),
    ],
    ids=["key_padding_of_another_batch", "integer_mask"],
)
def test_a_site_mask_sdpa_refuses_is_refused_naming_its_shape_or_dtype(mask, match):
    """A bool key-padding mask (B', 1, 1, Lk) of another batch (SDPA cannot broadcast it) and an
    integer 0/1 mask (SDPA takes bool or floating only) are refused, not read as a batch-B keep
    vector or added to the logits: ``UnsupportedAttention``, so a rewritten site falls back to SDPA."""
    q, k, v = qkv(2, 2, 2, 8, 8, 16, torch.float32)
    layout = BlockLayout.dense(block_q=8, block_k=8, q_len=8, kv_len=8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(UnsupportedAttention, match=match):
        sparse_attention(q, k, v, layout, attn_mask=mask)


@pytest.mark.parametrize("block_q", [0, 16.0])
def test_a_block_size_that_is_not_a_positive_int_is_named(block_q):
    q, k, v = qkv(1, 1, 1, 20, 20, 16, torch.float32)
    counts, indices = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"block_q must be a positive int, got {block_q!r}"):
        launch(q, k, v, counts, indices, None, None, None, None, block_q, 16, None, False)


def test_cuda_graph_capture_launches_a_fixed_config_that_tiles_the_layout_blocks():
    from li_compile.kernels.block_sparse_attention import CAPTURE_CONFIG, _fixed_launch

    assert _fixed_launch(128, 128, interpreting=False) == dict(
        zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), CAPTURE_CONFIG)
    )
    tiles = _fixed_launch(48, 96, interpreting=False)
    assert 48 % tiles["BLOCK_M"] == 0 and 96 % tiles["BLOCK_N"] == 0
    with pytest.raises(UnsupportedAttention, match="8x8"):
        _fixed_launch(8, 8, interpreting=False)


H100_SHARED_MEMORY = 232448  # bytes per block (opt-in), what Triton reported launching fp32 128x128 tiles


@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_configs_that_overflow_shared_memory_are_never_launched(elem, dim):
    from li_compile.kernels.block_sparse_attention import (
        CAPTURE_CONFIG, CUDA_CONFIGS, SMALL_BLOCK_CONFIGS, _fixed_launch, fitting_configs, shared_memory_bytes,
    )

    memory = lambda m, n, stages: shared_memory_bytes(m, n, stages, dim, dim, elem)  # noqa: E731
    configs = CUDA_CONFIGS + SMALL_BLOCK_CONFIGS
    kept = fitting_configs(configs, 128, 128, memory, H100_SHARED_MEMORY)
    assert kept and all(memory(m, n, s) <= H100_SHARED_MEMORY for m, n, _, s in kept)
    tiled_and_small_enough = [c for c in configs if memory(c[0], c[1], c[3]) <= H100_SHARED_MEMORY]
    assert set(kept) <= set(tiled_and_small_enough)
    tiles = _fixed_launch(128, 128, False, memory, H100_SHARED_MEMORY)
    assert memory(tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["num_stages"]) <= H100_SHARED_MEMORY
    if memory(CAPTURE_CONFIG[0], CAPTURE_CONFIG[1], CAPTURE_CONFIG[3]) <= H100_SHARED_MEMORY:
        assert (tiles["BLOCK_M"], tiles["BLOCK_N"]) == CAPTURE_CONFIG[:2]


# Shared memory Triton 3.6 asked for (fp32, head dim 128, 3 stages) when it refused to launch on
# an H100/H200: {(BLOCK_M, BLOCK_N): bytes}. The estimate must never be below what Triton takes.
TRITON_REFUSED_FP32_D128 = {(128, 128): 458752, (64, 64): 262144}


def test_shared_memory_bounds_what_triton_asked_for():
    from li_compile.kernels.block_sparse_attention import shared_memory_bytes

    for (m, n), asked in TRITON_REFUSED_FP32_D128.items():
        assert asked <= shared_memory_bytes(m, n, 3, 128, 128, 4) <= asked * 1.25
    with pytest.raises(UnsupportedAttention, match="shared memory"):
        from li_compile.kernels.block_sparse_attention import CUDA_CONFIGS, fitting_configs

        fitting_configs(CUDA_CONFIGS, 128, 128, lambda m, n, s: shared_memory_bytes(m, n, s, 1024, 1024, 4), 1000)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("kv_num_blocks", torch.zeros(1, 1, 5, dtype=torch.int32), "kv_num_blocks"),
        ("kv_indices", torch.zeros(1, 1, 1, 1, dtype=torch.int64), "kv_indices"),
        ("key_keep", torch.ones(3, 8, dtype=torch.bool), "key_keep"),
    ],
    ids=["query_blocks", "index_dtype", "keep_batch"],
)
def test_layout_tensors_that_do_not_fit_the_call_are_refused_before_launch(field, value, match):
    q, k, v = qkv(2, 2, 2, 8, 8, 16, torch.float32)
    layout = BlockLayout.dense(block_q=8, block_k=8, q_len=8, kv_len=8)
    args = dict(
        kv_num_blocks=layout.kv_num_blocks, kv_indices=layout.kv_indices, full_kv_num_blocks=None,
        full_kv_indices=None, key_keep=None,
    )
    args[field] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.li.block_sparse_attention(q, k, v, *args.values(), None, 8, 8, None, False)


def _autotune_key(monkeypatch, q, k, v, layout, span=(0, 0), seed=None) -> tuple:
    """The key Triton's autotuner would choose a config by for this call (``launch_split`` with a
    dense ``span`` and flash ``seed``): the ``AUTOTUNE_KEY`` arguments and every tensor argument's
    dtype (the launch is recorded, not run)."""
    from li_compile.kernels import block_sparse_attention as kernel_module

    calls = []

    class Recorder:
        arg_names = kernel_module._attention_kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **flags: calls.append((args, flags))

    recorder = Recorder()
    monkeypatch.setattr(kernel_module, "_kernels", lambda: kernel_module._Kernels(recorder, recorder, None, "recorded"))
    kernel_module.launch_split(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
                               layout.full_kv_indices, layout.key_keep, None, layout.block_q, layout.block_k, None,
                               False, span=span, seed=seed)
    (args, flags), = calls
    named = {**dict(zip(Recorder.arg_names, args)), **flags}
    return (tuple(named[name] for name in kernel_module.AUTOTUNE_KEY)
            + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))


def test_capacity_buckets_with_and_without_key_padding_share_one_autotune_key(monkeypatch):
    """A model's buckets differ in sequence lengths (within a size class of the query count), key
    padding and full blocks: one tuning serves them all (its configs compile once at warm-up), while
    another head dim, or a query count 4x as long, is tuned on its own."""
    g = torch.Generator().manual_seed(0)
    small = random_layout(g, 1, 2, 32, 64, 16, 16, with_full=True, with_keep=True)
    full = random_layout(g, 1, 2, 48, 96, 16, 16, with_full=False, with_keep=False)
    long = random_layout(g, 1, 2, 128, 96, 16, 16, with_full=False, with_keep=False)
    key_small = _autotune_key(monkeypatch, *qkv(1, 2, 2, 32, 64, 32, torch.float32), small)
    key_full = _autotune_key(monkeypatch, *qkv(1, 2, 2, 48, 96, 32, torch.float32), full)
    key_other_dim = _autotune_key(monkeypatch, *qkv(1, 2, 2, 48, 96, 64, torch.float32), full)
    key_long = _autotune_key(monkeypatch, *qkv(1, 2, 2, 128, 96, 32, torch.float32), long)
    assert key_small == key_full
    assert key_other_dim != key_full
    assert key_long != key_full


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_dense_span_visited_or_seeded_by_flash_shares_the_plain_calls_autotune_key(monkeypatch, dtype):
    """The span's code paths differ in their prologue only: a model whose context pass visits its
    span and whose chunk steps are seeded by flash tunes once, not once per path."""
    g = torch.Generator().manual_seed(1)
    layout = random_layout(g, 1, 2, 32, 64, 16, 16, with_full=True, with_keep=True)
    q, k, v = qkv(1, 2, 2, 32, 64, 32, dtype)
    seed = (torch.zeros(1, 2, 1, 32, 32, dtype=dtype), torch.zeros(1, 2, 1, 32, dtype=torch.float32))
    plain = _autotune_key(monkeypatch, q, k, v, layout)
    assert _autotune_key(monkeypatch, q, k, v, layout, span=(0, 2)) == plain
    assert _autotune_key(monkeypatch, q, k, v, layout, span=(0, 2), seed=seed) == plain


def test_only_the_first_launch_of_a_call_shape_counts_as_kernel_warm_up():
    """``first_launch_seconds`` grows by the first launch of a shape (on the GPU: compiling and
    autotuning, what the kernel adds to warm-up) and not by a repeat of it."""
    from li_compile.kernels.block_sparse_attention import first_launch_seconds, launched_shapes

    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(1, 3, 3, 41, 77, 16, torch.float32)  # a shape no other test launches
    layout = random_layout(g, 1, 3, 41, 77, 16, 16)
    before_s, before_shapes = first_launch_seconds(), launched_shapes()
    first = sparse_attention(q, k, v, layout)
    after_first_s = first_launch_seconds()
    again = sparse_attention(q, k, v, layout)
    assert launched_shapes() == before_shapes + 1
    assert after_first_s > before_s
    assert first_launch_seconds() == after_first_s
    torch.testing.assert_close(again, first)


class _RecordingAutotuner:
    """What ``_compile_candidates`` uses of Triton's autotuner: its argument names, key, cache of
    tuned keys, configs and ``warmup`` (here recording whether it ran under async compilation)."""

    arg_names = ["X", "H", "FLAG"]
    keys = ["H", "FLAG"]

    def __init__(self, tuned=(), fails=False):
        self.configs, self.cache, self.fails, self.builds = [1, 2, 3], dict.fromkeys(tuned), fails, []
        self.flags = []  # the flags of each call built

    def warmup(self, *args, grid, **flags):
        from triton.runtime._async_compile import active_mode

        if self.fails:
            raise RuntimeError("cannot build")
        self.builds.append(active_mode.get() is not None)
        self.flags.append(flags)


def _call(flag=True, use_tma=False, key=("padded",)):
    from li_compile.kernels import block_sparse_attention as kernel_module

    return kernel_module.KernelCall((torch.zeros(2), 4), {"FLAG": flag}, lambda meta: (1,), use_tma, torch.float32, key)


def _candidates(tuner, kernels=None, siblings=None):
    from li_compile.kernels import block_sparse_attention as kernel_module

    kernels = kernels or kernel_module._Kernels(None, None, None, "none")
    kernel_module._compile_candidates(kernels, tuner, _call(), siblings)
    return kernels


def test_before_a_first_tuning_the_candidates_are_built_under_triton_async_compilation():
    from triton.runtime._async_compile import active_mode

    tuner = _RecordingAutotuner()
    assert _candidates(tuner).parallel_compile_failure is None
    assert tuner.builds == [True]
    assert active_mode.get() is None  # the mode ends with the builds


def test_a_key_the_autotuner_has_tuned_builds_nothing_ahead():
    tuner = _RecordingAutotuner(tuned=[(4, True, "torch.float32")])
    _candidates(tuner)
    assert tuner.builds == []


def test_a_first_tuning_builds_its_candidates_for_the_later_code_paths_in_the_same_async_compilation(monkeypatch):
    """The siblings a call names (its unpadded context's launch) get every candidate built with its
    own, in one parallel build, where the host has a core for each build; a sibling of the other load
    kind (another autotuner) or of the same call shape adds nothing, and siblings that cannot be
    prepared leave the call's own builds as they were."""
    monkeypatch.setattr("os.cpu_count", lambda: 6)  # a core for each of 3 candidates, twice
    tuner = _RecordingAutotuner()
    others = [_call(False, key=("unpadded",)), _call(False, use_tma=True, key=("tma",)), _call(True)]
    assert _candidates(tuner, siblings=lambda: others).parallel_compile_failure is None
    assert tuner.builds == [True, True]
    assert tuner.flags == [{"FLAG": True}, {"FLAG": False}]

    def unpreparable():
        raise RuntimeError("flash refused")

    tuner = _RecordingAutotuner()
    assert _candidates(tuner, siblings=unpreparable).parallel_compile_failure is None
    assert tuner.flags == [{"FLAG": True}]

    monkeypatch.setattr("os.cpu_count", lambda: 5)  # fewer cores than builds: the call's own only
    tuner = _RecordingAutotuner()
    _candidates(tuner, siblings=lambda: others)
    assert tuner.flags == [{"FLAG": True}]


def test_a_tuned_key_does_not_prepare_siblings():
    asked = []
    _candidates(_RecordingAutotuner(tuned=[(4, True, "torch.float32")]), siblings=lambda: asked.append(1) or [])
    assert asked == []


class _TunedAutotuner:
    """What ``_adopt_neighbour_choice`` uses of Triton's autotuner: argument names, key, choices made."""

    arg_names = ["X", "H", "Lq", "q_class"]
    keys = ["H", "q_class"]

    def __init__(self):
        self.cache = {}


def _sized_call(heads, q_len):
    from li_compile.kernels import block_sparse_attention as kernel_module

    args = (torch.zeros(1), heads, q_len, kernel_module.q_size_class(q_len))
    return kernel_module.KernelCall(args, {}, lambda meta: (1,), False, torch.float32, (heads, q_len))


def test_a_call_near_a_tuned_query_count_of_the_next_size_class_takes_its_choice():
    """Matrix-Game full's buckets run 13200-16720 queries, on both sides of 4**7: the second size
    class takes the choice the first was tuned to instead of timing the configs again. A query count
    more than 2x away, or another head count, is tuned on its own."""
    from li_compile.kernels import block_sparse_attention as kernel_module

    kernels, tuner = kernel_module._Kernels(None, None, None, "none"), _TunedAutotuner()
    first = _sized_call(24, 16720)
    assert not kernel_module._adopt_neighbour_choice(kernels, tuner, first)  # the autotuner tunes it
    tuner.cache[kernel_module._tuning_key(tuner, first)] = "its choice"
    near = _sized_call(24, 13200)
    assert kernel_module.q_size_class(13200) != kernel_module.q_size_class(16720)
    assert kernel_module._adopt_neighbour_choice(kernels, tuner, near)
    assert tuner.cache[kernel_module._tuning_key(tuner, near)] == "its choice"
    assert not kernel_module._adopt_neighbour_choice(kernels, tuner, _sized_call(24, 4000))  # 4.2x fewer
    assert not kernel_module._adopt_neighbour_choice(kernels, tuner, _sized_call(40, 13200))


def test_tuned_configs_names_each_tunings_key_and_the_config_it_chose(monkeypatch):
    """What a benchmark logs beside its timings: the autotuner's choice per key, readable."""
    import triton

    from li_compile.kernels import block_sparse_attention as kernel_module

    key = (24, 1, 128, 128, 128, 128, 0, False, "tf32", 6, "torch.bfloat16")
    tma = _TunedAutotuner()
    tma.cache[key] = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    monkeypatch.setattr(kernel_module, "_KERNELS", kernel_module._Kernels(None, _TunedAutotuner(), tma, None))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    named = "H=24 GROUP=1 D=128 DV=128 block_q=128 block_k=128 MASK_KIND=0 IS_CAUSAL=False INPUT_PRECISION=tf32 q_class=6"
    assert kernel_module.tuned_configs() == {f"{named} (tma)": "128x64, warps 4, stages 2"}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_module.tuned_configs() == {}  # the interpreter never tunes


def test_a_failed_parallel_build_is_reported_and_not_tried_again():
    kernels = _candidates(_RecordingAutotuner(fails=True))
    assert kernels.parallel_compile_failure == "RuntimeError: cannot build"
    tuner = _RecordingAutotuner()
    _candidates(tuner, kernels)
    assert tuner.builds == []


def test_the_scalars_left_unspecialised_are_kernel_arguments_and_no_tensor_stride_that_loads_vectors():
    """``BUCKET_SCALARS`` (the integers that change with a capacity bucket, which Triton must not
    specialise on) each name an argument of the kernel: a misspelt name would be specialised silently.
    The Q/K/V/output strides, whose multiples of 16 let loads vectorise, are not among them."""
    import inspect

    from li_compile.kernels import block_sparse_attention as kernel_module

    names = inspect.signature(kernel_module._attention_kernel.fn).parameters
    assert set(kernel_module.BUCKET_SCALARS) <= set(names)
    vector_strides = {f"stride_{t}{d}" for t in "qkvo" for d in ("b", "h", "m", "n")} & set(names)
    assert len(vector_strides) == 12 and not vector_strides & set(kernel_module.BUCKET_SCALARS)


def test_on_hopper_the_listed_key_and_value_tiles_load_asynchronously_so_the_loop_pipelines(tmp_path):
    """Compiled ahead of time for sm90 (no GPU needed): in every key loop of the plain-load kernel
    (ragged blocks, with and without a key keep vector), K and V tiles arrive by asynchronous copies,
    which Triton's pipeliner issues stages ahead, not by synchronous loads; the output of a ragged
    query count stores in 16-byte vectors. A mask that varies along the head dim (a runtime ``D``
    compare) blocks both: the accesses stop vectorising (the loads ran synchronously, one block at a
    time)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_codegen.py"), "--configs", "64,64,4,3",
                          "--loads", "plain", "--json", "-"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    builds = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(build["keep"] for build in builds) == [False, True]
    for build in builds:
        assert len(build["loops"]) == 2  # the full-block and the partial-block loop
        for loop in build["loops"]:
            assert (loop["sync_tiles"], loop["async_tiles"]) == (0, 2), build  # K and V, copied ahead
        assert build["stores"] > 0 and build["vector_stores"] == build["stores"], build  # 16 bytes at a time
