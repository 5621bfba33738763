"""On the GPU: the compiled (not interpreted) kernel in bf16/fp16/fp32 equals the fp32 reference, and a
CUDA graph captured around it follows in-place layout updates. Skipped without CUDA."""

import pytest
import torch

from li_compile.kernels.block_layout import BlockLayout
from li_compile.kernels.block_sparse_attention import sparse_attention

from test_kernel import random_layout, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

RELATIVE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-3}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dim", [64, 128, 80])
@pytest.mark.parametrize("mask_kind", [None, "causal", "bool"])
def test_gpu_kernel_matches_the_fp32_reference(dtype, dim, mask_kind):
    g = torch.Generator().manual_seed(dim)
    q = torch.randn(2, 8, 300, dim, generator=g).to("cuda", dtype)
    k = torch.randn(2, 4, 700, dim, generator=g).to("cuda", dtype)
    v = torch.randn(2, 4, 700, dim, generator=g).to("cuda", dtype)
    layout = random_layout(g, 2, 8, 300, 700, 64, 128).to("cuda")
    mask = torch.rand(2, 1, 300, 700, generator=g).cuda() < 0.8 if mask_kind == "bool" else None
    out = sparse_attention(q, k, v, layout, attn_mask=mask, is_causal=mask_kind == "causal")
    ref = reference(q, k, v, layout.to("cuda"), mask, mask_kind == "causal")
    assert rel_err(out, ref) < RELATIVE[dtype]


def test_a_captured_cuda_graph_follows_in_place_layout_updates():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 512, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    dense = BlockLayout.dense(block_q=128, block_k=128, q_len=512, kv_len=512, device="cuda")
    sparse = random_layout(g, 1, 1, 512, 512, 128, 128, shared=True, with_keep=False).to("cuda")
    live = BlockLayout.dense(block_q=128, block_k=128, q_len=512, kv_len=512, device="cuda")  # updated in place
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sparse_attention(q, k, v, live)  # warm-up outside the capture: compile and autotune there
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = sparse_attention(q, k, v, live)
    torch.cuda.current_stream().wait_stream(stream)
    for layout in (dense, sparse):
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            getattr(live, name).copy_(getattr(layout, name))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(q, k, v, layout)) < RELATIVE[torch.bfloat16]


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_top_k_selection_runs_the_kernel_on_the_gpu_and_equals_its_masked_reference(density):
    """``sparsity.density`` on the GPU: the refined layout is built on the device and the kernel
    computes SDPA under exactly that layout's mask (bf16 against fp32)."""
    from li_compile.kernels.tiling import own_blocks, topk_layout

    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 1000, 128, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(1, 4, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(1, 4, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    within = random_layout(g, 1, 1, 1000, 3000, 128, 128, shared=True).to("cuda")
    own = own_blocks(1000, 3000, 128, 128, "cuda")
    layout = topk_layout(q, k, density, block_q=128, block_k=128, always=own, within=within)
    assert layout.block_mask().float().mean() < within.block_mask().float().mean()
    out = sparse_attention(q, k, v, layout)
    assert rel_err(out, reference(q, k, v, layout)) < RELATIVE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_gpu_split_path_flash_plus_triton_matches_the_fp32_reference(monkeypatch, dtype, heads, kv_heads):
    """The chunk's own keys through cuDNN (bf16/fp16) or the efficient kernel (fp32), the rest
    through the Triton kernel, merged by LSE; ragged lengths."""
    from li_compile.kernels import split_attention as split_attention_module
    from li_compile.kernels.split_attention import chunk_span, split_attention, split_layout, split_path
    from test_kernel_split import reference as split_reference

    g = torch.Generator().manual_seed(11)
    monkeypatch.setattr(split_attention_module, "MIN_FLASH_SPAN_WORK", 0)  # flash for this small span too
    q = torch.randn(2, heads, 1000, 128, generator=g).to("cuda", dtype)
    k = torch.randn(2, kv_heads, 3000, 128, generator=g).to("cuda", dtype)
    v = torch.randn(2, kv_heads, 3000, 128, generator=g).to("cuda", dtype)
    span = chunk_span(1000, 3000, 128)
    layout = split_layout(random_layout(g, 2, heads, 1000, 3000, 128, 128).to("cuda"), span)
    assert split_path(q, k, v, layout, span) == ("efficient" if dtype == torch.float32 else "cudnn") + " + triton"
    out = split_attention(q, k, v, layout, span)
    assert rel_err(out, split_reference(q, k, v, layout, span)) < RELATIVE[dtype]


def test_gpu_a_span_too_short_for_flash_runs_in_the_kernel_and_matches_the_reference():
    from li_compile.kernels.split_attention import chunk_span, split_attention, split_layout, split_path
    from test_kernel_split import reference as split_reference

    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 8, n, 128, generator=g).to("cuda", torch.bfloat16) for n in (256, 1024, 1024))
    span = chunk_span(256, 1024, 128)
    layout = split_layout(random_layout(g, 2, 8, 256, 1024, 128, 128).to("cuda"), span)
    assert split_path(q, k, v, layout, span).startswith("triton (span in-kernel: a span of 256 keys")
    out = split_attention(q, k, v, layout, span)
    assert rel_err(out, split_reference(q, k, v, layout, span)) < RELATIVE[torch.bfloat16]


@pytest.mark.parametrize("variant", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_every_fused_partial_gives_the_natural_log_sum_exp_of_its_span(monkeypatch, variant, heads, kv_heads):
    """Each fused SDPA kernel the split path may pick returns o and lse that equal the fp32
    reference over the span's keys (the merge relies on lse being a natural log, row for row)."""
    from li_compile.kernels import split_attention as split

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, heads, 1000, 128, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(1, kv_heads, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(1, kv_heads, 3000, 128, generator=g).to("cuda", torch.bfloat16)
    span = split.chunk_span(1000, 3000, 128)
    keys = slice(span[0] * 128, 3000)
    scale = 128 ** -0.5
    monkeypatch.setattr(split, "_variants", lambda _q: (variant,))
    (o, lse), used = split.flash_partial(q, k, v, span, 128, scale)
    assert used == variant
    group = heads // kv_heads
    kf = k[:, :, keys].float().repeat_interleave(group, 1)
    vf = v[:, :, keys].float().repeat_interleave(group, 1)
    scores = q.float() @ kf.transpose(-1, -2) * scale
    want_lse = scores.logsumexp(-1).unflatten(1, (kv_heads, group))
    want_o = (scores.softmax(-1) @ vf).unflatten(1, (kv_heads, group))
    assert (lse.float() - want_lse).abs().max().item() < 2e-2
    assert rel_err(o, want_o) < RELATIVE[torch.bfloat16]


def test_writing_and_clearing_a_plan_from_the_host_never_makes_the_host_wait_for_the_device():
    from li_compile.passes.guards import write_plan
    from li_compile.plan import Plan, SlotSignature

    g = torch.Generator().manual_seed(1)
    slot = Plan().slot_for(SlotSignature(1, 4, 512, 1024, "cuda", 128, 128))
    layout = random_layout(g, 1, 4, 512, 1024, 128, 128)  # on the host, as the controller builds it
    tiling = tuple(torch.randperm(n, generator=g) for n in (512, 1024, 512))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            slot.set_layout(layout, tiling=tiling)
            first = slot.tiling
            slot.clear()
            write_plan([slot], layout)  # the guarded path a frame plan takes
            slot.set_layout(layout, tiling=tiling)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(a is b for a, b in zip(first, slot.tiling))  # the same permutations: uploaded once
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "key_keep"):
        want = getattr(layout, name)
        got = getattr(slot, name)[..., : want.shape[-1]] if name.endswith("indices") else getattr(slot, name)
        assert torch.equal(got.cpu(), want.expand_as(got).cpu()), name
    assert torch.equal(slot.tiling[1].cpu(), tiling[1])


_TUNE_ONCE = """
import sys
import torch
import triton.runtime.autotuner as autotuner
from li_compile.kernels.block_layout import BlockLayout
from li_compile.kernels.block_sparse_attention import sparse_attention

if sys.argv[1] == "forbid":
    def refuse(*args, **kwargs):
        raise AssertionError("the autotuner timed a config")
    autotuner.Autotuner._bench = refuse
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
layout = BlockLayout.dense(block_q=128, block_k=128, q_len=1024, kv_len=1024, device="cuda")
out = sparse_attention(q, k, v, layout)
torch.cuda.synchronize()
print(float(out.float().abs().sum()))
"""


def test_a_second_process_with_the_same_triton_cache_reuses_the_tuning_and_times_nothing(tmp_path):
    """The autotuner's choice persists in TRITON_CACHE_DIR: a restarted server skips the tuning."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", _TUNE_ONCE, "tune"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert list(tmp_path.rglob("*.autotune.json")), "the first process stored no tuning"
    second = subprocess.run([sys.executable, "-c", _TUNE_ONCE, "forbid"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert float(second.stdout.split()[-1]) == pytest.approx(float(first.stdout.split()[-1]), rel=1e-3)


_BUILD_FIRST = """
import torch
import triton.runtime.autotuner as autotuner
import triton.runtime.jit as jit
from li_compile.kernels import block_sparse_attention as bsa
from li_compile.kernels.block_layout import BlockLayout

timing, built_while_timing, timed = [False], [], []
bench, compile_ = autotuner.Autotuner._bench, jit.JITFunction._do_compile

def timed_bench(self, *args, config, **kwargs):
    timing[0] = True
    timed.append(config)
    try:
        return bench(self, *args, config=config, **kwargs)
    finally:
        timing[0] = False

def watched_compile(self, *args, **kwargs):
    if timing[0]:
        built_while_timing.append(args[0])
    return compile_(self, *args, **kwargs)

autotuner.Autotuner._bench = timed_bench
jit.JITFunction._do_compile = watched_compile
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
layout = BlockLayout.dense(block_q=128, block_k=128, q_len=1024, kv_len=1024, device="cuda")
out = bsa.sparse_attention(q, k, v, layout)
want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
err = ((out.float() - want).norm() / want.norm()).item()
print(len(timed), len(built_while_timing), err, bsa._kernels().parallel_compile_failure, sep="|")
"""


def test_a_tuning_times_configs_already_built_in_parallel(tmp_path):
    """Before its first tuning the kernel builds every candidate config at once (threads), so the
    autotuner's timing loop builds nothing; the output still equals SDPA."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _BUILD_FIRST], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    timed, built_while_timing, err, failure = run.stdout.strip().splitlines()[-1].split("|", 3)
    assert int(timed) > 1 and failure == "None", failure
    assert int(built_while_timing) == 0
    assert float(err) < RELATIVE[torch.bfloat16]


_BUCKETS = """
import torch
import triton.runtime.jit as jit
from li_compile.kernels.block_layout import BlockLayout
from li_compile.kernels.block_sparse_attention import sparse_attention

builds, compile_ = [], jit.JITFunction._do_compile

def counted_compile(self, *args, **kwargs):
    if self.fn.__name__ == "_attention_kernel":
        builds.append(args[0])
    return compile_(self, *args, **kwargs)

jit.JITFunction._do_compile = counted_compile
torch.manual_seed(0)
counts, errors = [], []
for length in (1112, 1120, 1128):  # one size class; Lk not a multiple of 16, a multiple, not one
    q, k, v = (torch.randn(1, 4, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = BlockLayout.dense(block_q=128, block_k=128, q_len=length, kv_len=length, device="cuda")
    out = sparse_attention(q, k, v, layout)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    errors.append(((out.float() - want).norm() / want.norm()).item())
    counts.append(len(builds))
print(*counts, max(errors), sep="|")
"""


def test_capacity_buckets_of_one_model_share_one_kernel_build(tmp_path):
    """Sequence lengths that differ only in their divisibility (a model's capacity buckets) reuse the
    first length's tuned binary: no build after the first, and every output equals SDPA."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _BUCKETS], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    first, second, third, err = run.stdout.strip().splitlines()[-1].split("|")
    assert int(first) >= 1 and int(second) == int(first) and int(third) == int(first)
    assert float(err) < RELATIVE[torch.bfloat16]
