"""Block-sparse forward attention for Hopper written in Gluon, with FlashAttention-3 style
intra-warpgroup pipelining (softmax of one tile overlapping the asynchronous P V wgmma of the
previous one). A research prototype: it lives outside the package, nothing imports it, and it
exists so that a session with an H100 can test whether this overlap closes the gap between the
repo's Triton kernel (``kernels/block_sparse_attention.py``, 0.83-0.87 of cuDNN's per-block rate:
Triton 3.6 emits ``wgmma.wait_group 0`` right after every wgmma) and flash's rate.

The kernel: one program = BLOCK_M query rows of one (batch, head); head dim 128; bf16/fp16 in, fp32
online softmax in base 2 (the scale folded into ``exp2``); the keys are the 128-key blocks listed in
``counts`` (B, H, Lq/128) / ``indices`` (B, H, Lq/128, capacity), each visited as 128/BLOCK_N tiles
of BLOCK_N keys; GQA through ``h // group``. Q arrives once by TMA; K and V go through TMA into
rings of NUM_BUF shared buffers, one mbarrier per buffer (K and V apart, so S_j needs only K_j).
num_warps 8 = two consumer warpgroups of 64 rows each (FA3's layout, no producer warpgroup: one
thread issues the TMA copies). The loop, per tile j >= 1 (tile 0's S and softmax are the prologue,
the last P V the epilogue):

    wait K_j; issue S_j = Q K_j^T (async)          | in flight: S_j
    [PIN_ORDER: warpgroup_mma_wait(1, deps=[acc])]  | no-op wait: keeps the rescale after the issue
    acc *= alpha_{j-1}                             | registers, while S_j runs
    wait V_{j-1}; issue acc += P_{j-1} V_{j-1}      | in flight: S_j, PV_{j-1}
    S_j = warpgroup_mma_wait(1, deps=[S_j])         | S_j done, PV_{j-1} still running
    refill K slot j % NUM_BUF with tile j + NUM_BUF
    softmax(S_j) -> P_j (bf16, wgmma register-A layout), alpha_j, m, l   | overlaps PV_{j-1}
    acc, P_{j-1} = warpgroup_mma_wait(0, deps=[acc, P_{j-1}])   | P_{j-1}'s registers live until done
    refill V slot (j-1) % NUM_BUF with tile j - 1 + NUM_BUF

Loads of tiles past the list are predicated off (never waited on); a program whose query block lists
no key block skips everything and writes zeros (l == 0 guarded). O goes out by TMA through Q's
buffer. Assumed (a prototype): Lq, Lk multiples of 128, every listed index valid, contiguous
(B, H, L, 128) tensors, block_q = block_k = 128.

Commands::

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0     # the GPU machine's Triton
    PYTHONPATH=. /tmp/t36/bin/python benchmarks/gluon_attention.py --compile-only [--configs ...] [--json FILE]
    timeout 300 bash benchmarks/run_on_device.sh python benchmarks/gluon_attention.py [--bench cudagraph] [--json FILE]
    # (a changed config could hang on a barrier phase: keep the timeout)

``--compile-only`` needs no GPU and no torch (Triton 3.6 only). The default mode (GPU) first checks a
small GQA case with 0, 1, 2 and all key blocks listed, then B=1, H=24, Lq=3840, Lk=15360 bf16 at
densities 1, 0.5, 0.25 (``benchmarks/attention.py``'s random layouts) against a float32 masked-dense
reference, and times each config against dense SDPA and the repo's ``sparse_attention`` (TFLOP/s per
visited block).

Verified offline (Triton 3.6.0, sm90): every config in ``CONFIGS`` builds. The loop's PTX has
``wgmma.wait_group 1`` after the P V issue, and the final SASS keeps the softmax's 64 ``MUFU.EX2``
(per thread, BLOCK_N 128) between that ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` and the ``0x0`` one; no
spills and no ptxas "wgmma serialized" warning for (128,128,8 warps), (128,64,8), (64,128,4),
(64,64,4). (128,128,4 warps) does not fit in registers (spills, ptxas serializes the wgmma) and
(128,64,4) spills a little and ptxas hoists the wait 0 above the softmax: kept as data points.
Measured on an H100 (torch 2.11, Triton 3.6; ``benchmarks/results/gluon_attention.json``): every
config is correct (2e-3 relative to the fp32 reference, every edge case) and nothing hangs, but none
is faster than the repo's Triton kernel where it matters: at 3840 x 15360, 24 heads, the best config
(128, 128, 8 warps, 2 buffers) gives 509 / 473 / 457 TFLOP/s per visited block at densities 1 /
0.5 / 0.25 against the Triton kernel's 488 / 503 / 469 and cuDNN's 598; (128, 128, 4 warps) 146.
Known cost: Triton's barrier analysis adds ~4 CTA-wide ``bar.sync`` per loop iteration around the
TMA refills (two are needed with 8 warps, as one thread refills a slot both warpgroups read; two are
not).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from benchmarks.cubin_tools import nvidia_bin, resources, sass

BLOCK_K = 128  # keys per listed block (the layout's block_k); also the query block (block_q)
HEAD_DIM = 128
FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "NUM_BUF", "PIN_ORDER")
CONFIGS = [(128, 128, 8, 2, 1), (128, 128, 8, 2, 0), (128, 64, 8, 3, 1), (64, 128, 4, 2, 1), (64, 128, 4, 2, 0),
           (64, 64, 4, 2, 1), (64, 64, 4, 3, 1), (128, 64, 4, 2, 1), (128, 128, 4, 2, 1)]


# -- kernel ---------------------------------------------------------------------------------------


@gluon.jit
def _issue_tile(desc, ring, bars, tile, n_tiles, idx_base, kv_row0, indices_ptr,
                SUBS: gl.constexpr, NUM_BUF: gl.constexpr):
    """TMA-load key tile ``tile`` (of the program's list) into ring slot ``tile % NUM_BUF``;
    nothing when ``tile >= n_tiles``."""
    BLOCK_N: gl.constexpr = desc.block_type.shape[0]
    live = tile < n_tiles
    blk = gl.load(indices_ptr + idx_base + tile // SUBS, mask=live, other=0)
    row = kv_row0 + blk * (BLOCK_N * SUBS) + (tile % SUBS) * BLOCK_N
    slot = tile % NUM_BUF
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=live)
    tma.async_copy_global_to_shared(desc, [row, 0], bars.index(slot), ring.index(slot), pred=live)


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, p_layout: gl.constexpr, row_o: gl.constexpr, dtype: gl.constexpr):
    """Online softmax step in base 2 on the raw scores ``s``: P (bf16/fp16, as wgmma's register A
    operand), the factor for the accumulator (in the accumulator's row layout), new max and sum."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_new = l_i * alpha + gl.sum(p, axis=1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    return p_op, gl.convert_layout(alpha, row_o), m_new, l_new


@gluon.jit
def _attn_fwd(q_desc, k_desc, v_desc, o_desc, counts_ptr, indices_ptr, qk_scale,
              H, GROUP, LQ, LK, M_BLOCKS, CAPACITY,
              BLOCK_Q: gl.constexpr, NUM_BUF: gl.constexpr, PIN_ORDER: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    SUBS: gl.constexpr = BLOCK_Q // BLOCK_N  # tiles per listed key block (block_k == block_q here)
    QSPLIT: gl.constexpr = BLOCK_Q // BLOCK_M  # programs per listed query block
    NW: gl.constexpr = gl.num_warps()
    INSTR_K: gl.constexpr = 256 // dtype.primitive_bitwidth

    # wgmma layouts: warps stacked along M (each warpgroup owns 64 rows per instruction).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, INSTR_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD, INSTR_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                 k_width=32 // dtype.primitive_bitwidth)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kv_row0 = (b * (H // GROUP) + h // GROUP) * LK
    q_row = bh * LQ + pid_m * BLOCK_M
    cnt_off = bh * M_BLOCKS + pid_m // QSPLIT
    n_tiles = gl.load(counts_ptr + cnt_off) * SUBS
    idx_base = cnt_off * CAPACITY

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_BUF):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    acc = gl.zeros([BLOCK_M, HEAD], gl.float32, o_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    if n_tiles > 0:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        for t in gl.static_range(NUM_BUF):
            _issue_tile(k_desc, k_ring, k_bars, t, n_tiles, idx_base, kv_row0, indices_ptr, SUBS, NUM_BUF)
            _issue_tile(v_desc, v_ring, v_bars, t, n_tiles, idx_base, kv_row0, indices_ptr, SUBS, NUM_BUF)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)

        # prologue: S_0 and its softmax (nothing to overlap with yet)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        _issue_tile(k_desc, k_ring, k_bars, NUM_BUF, n_tiles, idx_base, kv_row0, indices_ptr, SUBS, NUM_BUF)
        p, alpha_o, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, p_layout, row_o, dtype)

        for j in range(1, n_tiles):
            ks = j % NUM_BUF
            mbarrier.wait(k_bars.index(ks), (j // NUM_BUF) & 1)
            s_tok = warpgroup_mma(q_smem, k_ring.index(ks).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if PIN_ORDER:
                # a no-op wait (only S_j is in flight) that makes the rescale start after S_j is issued
                acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            acc = acc * alpha_o[:, None]
            vs = (j - 1) % NUM_BUF
            mbarrier.wait(v_bars.index(vs), ((j - 1) // NUM_BUF) & 1)
            o_tok = warpgroup_mma(p, v_ring.index(vs), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
            # K slot ks is free (S_j done): fetch tile j + NUM_BUF into it
            _issue_tile(k_desc, k_ring, k_bars, j + NUM_BUF, n_tiles, idx_base, kv_row0, indices_ptr, SUBS, NUM_BUF)
            p_next, alpha_o, m_i, l_i = _softmax(s, m_i, l_i, qk_scale, p_layout, row_o, dtype)
            if PIN_ORDER:
                # P_j as an input of the wait: its bf16 conversion happens before, overlapping PV_{j-1}
                acc, p, p_next = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p, p_next])
            else:
                acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p])
            # V slot vs is free (PV_{j-1} done): fetch tile j - 1 + NUM_BUF into it
            _issue_tile(v_desc, v_ring, v_bars, j - 1 + NUM_BUF, n_tiles, idx_base, kv_row0, indices_ptr, SUBS,
                        NUM_BUF)
            p = p_next

        # epilogue: the last P V
        last = n_tiles - 1
        acc = acc * alpha_o[:, None]
        mbarrier.wait(v_bars.index(last % NUM_BUF), (last // NUM_BUF) & 1)
        o_tok = warpgroup_mma(p, v_ring.index(last % NUM_BUF), acc, is_async=True)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_BUF):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    l_o = gl.convert_layout(l_i, row_o)
    l_o = gl.where(l_o == 0.0, 1.0, l_o)  # rows with no visited key: acc is 0, output 0
    out = (acc / l_o[:, None]).to(dtype)
    q_smem.store(out)  # Q is no longer read: reuse its buffer for the TMA store
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(pendings=0)


# -- host -----------------------------------------------------------------------------------------


def _shared_layouts(block_m: int, block_n: int, dtype):
    """NVMMA shared layouts of the Q/O tile and of a K/V tile (Gluon dtype ``dtype``)."""
    return (gl.NVMMASharedLayout.get_default_for([block_m, HEAD_DIM], dtype),
            gl.NVMMASharedLayout.get_default_for([block_n, HEAD_DIM], dtype))


def launch(q, k, v, counts, indices, scale: float | None = None, block_m: int = 128, block_n: int = 128,
           num_warps: int = 8, num_buf: int = 2, pin_order: bool = True):
    """Block-sparse attention of q (B, H, Lq, 128) over k, v (B, Hkv, Lk, 128), visiting per
    128-row query block the 128-key blocks ``indices[b, h, qb, :counts[b, h, qb]]``."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    assert D == HEAD_DIM and v.shape[-1] == HEAD_DIM and Lq % BLOCK_K == 0 and Lk % BLOCK_K == 0
    assert H % Hkv == 0 and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
    m_blocks = Lq // BLOCK_K
    counts = counts.to(torch.int32).expand(B, H, m_blocks).contiguous()
    indices = indices.to(torch.int32).expand(B, H, m_blocks, indices.shape[-1]).contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    qo_layout, kv_layout = _shared_layouts(block_m, block_n, gdt)
    q2, o2 = q.view(B * H * Lq, D), o.view(B * H * Lq, D)
    k2, v2 = k.view(B * Hkv * Lk, D), v.view(B * Hkv * Lk, D)
    q_desc = TensorDescriptor.from_tensor(q2, [block_m, D], qo_layout)
    o_desc = TensorDescriptor.from_tensor(o2, [block_m, D], qo_layout)
    k_desc = TensorDescriptor.from_tensor(k2, [block_n, D], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v2, [block_n, D], kv_layout)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    grid = (Lq // block_m, B * H)
    _attn_fwd[grid](q_desc, k_desc, v_desc, o_desc, counts, indices, scale * math.log2(math.e),
                    H, H // Hkv, Lq, Lk, m_blocks, indices.shape[-1], BLOCK_K, num_buf, bool(pin_order),
                    num_warps=num_warps)
    return o


# -- offline build (no GPU, no torch) -------------------------------------------------------------


def build(config: tuple[int, ...], dtype: str = "bf16", arch: int = 90):
    """The kernel for ``config`` (see ``FIELDS``), compiled for ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    block_m, block_n, warps, num_buf, pin = config
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    qo_layout, kv_layout = _shared_layouts(block_m, block_n, gdt)
    desc = lambda rows, layout: f"tensordesc<{dtype}[{rows}, {HEAD_DIM}],{layout!r}>"
    types = {"q_desc": desc(block_m, qo_layout), "k_desc": desc(block_n, kv_layout),
             "v_desc": desc(block_n, kv_layout), "o_desc": desc(block_m, qo_layout),
             "counts_ptr": "*i32", "indices_ptr": "*i32", "qk_scale": "fp32"}
    constants = {"BLOCK_Q": BLOCK_K, "NUM_BUF": num_buf, "PIN_ORDER": bool(pin)}
    fn = _attn_fwd
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in constants:
            signature[name], constexprs[(i, )] = "constexpr", constants[name]
            continue
        signature[name] = types.get(name, "i32")
        if signature[name].startswith("*"):
            attrs[(i, )] = [["tt.divisibility", 16]]
    source = GluonASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def sass_overlap(cubin: bytes) -> dict:
    """What ptxas finally scheduled: per ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` (wgmma.wait_group 1) in the
    SASS, how many ``MUFU.EX2`` (softmax exponentials) come before the next DEPBAR, i.e. run while a
    wgmma group is still in flight; plus the CTA-wide ``BAR.SYNC`` count in the whole kernel."""
    code = sass(cubin)
    if not code:
        return {}
    ex2_after_wait1, open_count = [], None
    for line in code.splitlines():
        if "WARPGROUP.DEPBAR" in line:
            if open_count is not None:
                ex2_after_wait1.append(open_count)
            open_count = 0 if re.search(r"DEPBAR\.LE gsb0, 0x1", line) else None
        elif open_count is not None and "MUFU.EX2" in line:
            open_count += 1
    return {"ex2_after_wait1": ex2_after_wait1, "bar_sync": code.count("BAR.SYNC"), "hgmma": code.count("HGMMA.")}


def ctas_per_sm(shared_bytes: int, regs: int, warps: int) -> int:
    """Resident CTAs per H100 SM allowed by shared memory (228 KiB, 1 KiB reserved per CTA),
    registers (64K, allocated per warp in units of 256) and warps (64)."""
    by_smem = (228 * 1024) // (shared_bytes + 1024)
    by_regs = 65536 // (warps * (-(-regs * 32 // 256) * 256)) if regs else 0
    return min(by_smem, by_regs, 64 // warps)


def ptxas_notes(ptx: str, arch: str = "sm_90a") -> list[str]:
    """ptxas -v lines worth reading: spills and any 'wgmma ... serialized' performance warning."""
    ptxas = nvidia_bin("ptxas")
    if not ptxas.exists():
        return ["no ptxas"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    lines = (run.stdout + run.stderr).splitlines()
    return [line.strip() for line in lines if re.search(r"spill|serializ|wgmma|warning|error", line, re.I)]


def report(config, dtype: str = "bf16") -> dict:
    kernel = build(config, dtype)
    ptx = kernel.asm["ptx"]
    usage = resources(kernel.asm["cubin"])
    regs = re.search(r"REG:(\d+)", usage)
    return {"config": dict(zip(FIELDS, config)), "dtype": dtype,
            "wait_group": [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)],
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "commit_group": ptx.count("wgmma.commit_group"),
            "shared_bytes": kernel.metadata.shared, "resources": usage,
            "sass": sass_overlap(kernel.asm["cubin"]),
            "ctas_per_sm": ctas_per_sm(kernel.metadata.shared, int(regs.group(1)) if regs else 0, config[2]),
            "ptxas": ptxas_notes(ptx), "ttgir_local_alloc": kernel.asm["ttgir"].count("ttg.local_alloc")}


def compile_only(args) -> int:
    rows, ok = [], False
    for config in args.configs:
        try:
            row = report(config, args.dtype)
        except Exception as failure:  # say which config failed and why, go on
            rows.append({"config": list(config), "error": f"{type(failure).__name__}: {failure}"[-2000:]})
            print(f"{config}: build failed:\n{rows[-1]['error']}", file=sys.stderr)
            continue
        rows.append(row)
        ok |= any(n >= 1 for n in row["wait_group"])
        print(f"{config} {args.dtype}: wait_group {row['wait_group']}; {row['wgmma']} wgmma, "
              f"{row['commit_group']} commits; {row['shared_bytes']} B shared; {row['resources']}; "
              f"SASS: ex2 after each wait 1 {row['sass'].get('ex2_after_wait1')}, "
              f"{row['sass'].get('bar_sync')} BAR.SYNC; {row['ctas_per_sm']} CTA/SM; "
              f"ptxas: {row['ptxas'] or 'no warnings'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


# -- GPU check and timing -------------------------------------------------------------------------


def _reference(torch, q, k, v, layout, scale):
    """float32 attention under ``layout``'s token mask, one head at a time; rows with no visited key give 0."""
    B, H, Lq, _ = q.shape
    group = H // k.shape[1]
    mask = layout.to_dense_mask()  # (B|1, H|1, Lq, Lk)
    out = torch.empty(B, H, Lq, v.shape[-1], device=q.device, dtype=torch.float32)
    for h in range(H):
        dense = mask[:, min(h, mask.shape[1] - 1)]
        s = (q[:, h].float() @ k[:, h // group].float().transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~dense, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, h] = p @ v[:, h // group].float()
    return out


def _max_rel_err(out, ref) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _edge_check(torch, configs, gen) -> list[dict]:
    """Small GQA case (H 4 over 2 K/V heads) whose query blocks list 0, 1, 2 and all key blocks: the
    zero-row guard and tile counts below the ring depth (predicated prefetches) against the reference."""
    from li_compile.kernels.block_layout import BlockLayout

    B, H, Hkv, Lq, Lk = 2, 4, 2, 512, 1024
    q = torch.randn(B, H, Lq, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(B, Hkv, Lk, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(B, Hkv, Lk, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
    q_blocks, k_blocks = Lq // BLOCK_K, Lk // BLOCK_K
    mask = torch.zeros(B, H, q_blocks, k_blocks, dtype=torch.bool)  # query block 0: no key, zeros
    mask[:, :, 1, 3] = True  # one block
    mask[:, :, 2, 5] = mask[:, :, 2, 0] = True  # two blocks
    mask[:, :, 3] = True  # all blocks
    layout = BlockLayout.from_block_mask(mask, block_q=BLOCK_K, block_k=BLOCK_K, q_len=Lq, kv_len=Lk,
                                         full=mask).to("cuda")  # every listed block whole: the full lists
    counts, indices = layout.full_kv_num_blocks, layout.full_kv_indices
    scale = 1.0 / math.sqrt(HEAD_DIM)
    ref = _reference(torch, q, k, v, layout, scale)
    rows = []
    for config in configs:
        block_m, block_n, warps, num_buf, pin = config
        try:
            out = launch(q, k, v, counts, indices, scale, block_m, block_n, warps, num_buf, pin)
            torch.cuda.synchronize()
            err = _max_rel_err(out, ref)
            zero_rows = out[:, :, :BLOCK_K].abs().max().item()
            rows.append({"edge": True, "config": list(config), "max_rel_err": err, "zero_rows_max": zero_rows,
                         "ok": err < 1e-2 and zero_rows == 0.0})
        except Exception as failure:
            rows.append({"edge": True, "config": list(config), "error": f"{type(failure).__name__}: {failure}"[-1000:]})
        print(f"edge case {config}: {rows[-1]}")
    return rows


def gpu_main(args) -> None:
    import torch
    import triton.testing

    from benchmarks.attention import random_layout
    from li_compile.kernels.block_sparse_attention import sparse_attention

    if args.bench == "cudagraph":  # as benchmarks/attention.py times (no host launch cost)
        bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
    else:
        bench = lambda fn: triton.testing.do_bench(fn, return_mode="median")
    gen = torch.Generator().manual_seed(0)
    rows = _edge_check(torch, args.configs, gen)
    B, H, Lq, Lk, D = 1, 24, 3840, 15360, HEAD_DIM
    dtype = torch.bfloat16
    q = torch.randn(B, H, Lq, D, generator=gen).to("cuda", dtype)
    k = torch.randn(B, H, Lk, D, generator=gen).to("cuda", dtype)
    v = torch.randn(B, H, Lk, D, generator=gen).to("cuda", dtype)
    scale = 1.0 / math.sqrt(D)
    q_blocks, k_blocks = Lq // BLOCK_K, Lk // BLOCK_K
    flops_per_block = 4 * BLOCK_K * BLOCK_K * D  # QK^T and PV of one 128x128 block
    with torch.no_grad():
        sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    sdpa_tflops = B * H * q_blocks * k_blocks * flops_per_block / sdpa_ms / 1e9
    print(f"sdpa dense: {sdpa_ms:.3f} ms, {sdpa_tflops:.1f} TFLOP/s")
    for density in args.densities:
        # benchmarks/attention.py's random layout: every listed block whole (the full lists), the repo
        # kernel's fast path, so the two kernels visit the same blocks
        layout = random_layout(H, Lq, Lk, density, gen).to("cuda")
        counts, indices = layout.full_kv_num_blocks, layout.full_kv_indices
        visited = int(counts.sum()) * B
        ref = _reference(torch, q, k, v, layout, scale)
        with torch.no_grad():
            repo_err = _max_rel_err(sparse_attention(q, k, v, layout), ref)
            repo_ms = bench(lambda: sparse_attention(q, k, v, layout))
        repo_tflops = visited * flops_per_block / repo_ms / 1e9
        print(f"density {density}: repo kernel err {repo_err:.2e}, {repo_ms:.3f} ms, {repo_tflops:.1f} TFLOP/s")
        for config in args.configs:
            block_m, block_n, warps, num_buf, pin = config
            row = {"density": density, "config": dict(zip(FIELDS, config)), "visited_blocks": visited,
                   "sdpa_ms": sdpa_ms, "sdpa_tflops": sdpa_tflops, "repo_ms": repo_ms, "repo_tflops": repo_tflops,
                   "repo_max_rel_err": repo_err, "bench": args.bench}
            try:
                run = lambda: launch(q, k, v, counts, indices, scale, block_m, block_n, warps, num_buf, pin)
                out = run()
                torch.cuda.synchronize()
                err = _max_rel_err(out, ref)
                ms = bench(run)
                row.update(max_rel_err=err, ok=err < 1e-2, ms=ms, tflops=visited * flops_per_block / ms / 1e9)
                print(f"density {density} {config}: err {err:.2e} {'ok' if err < 1e-2 else 'WRONG'}; "
                      f"{ms:.3f} ms {row['tflops']:.1f} TFLOP/s | repo {repo_tflops:.1f} | sdpa {sdpa_tflops:.1f} "
                      f"(TFLOP/s per visited block)")
            except Exception as failure:
                row["error"] = f"{type(failure).__name__}: {failure}"[-1000:]
                print(f"density {density} {config}: {row['error']}", file=sys.stderr)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description="Gluon block-sparse attention for Hopper (research prototype)")
    parser.add_argument("--compile-only", action="store_true", help="build for sm90 offline and print codegen facts")
    parser.add_argument("--configs", nargs="*", default=[",".join(map(str, c)) for c in CONFIGS],
                        help="BLOCK_M,BLOCK_N,num_warps,NUM_BUF,PIN_ORDER ...")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="(compile-only)")
    parser.add_argument("--densities", nargs="*", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--bench", default="do_bench", choices=("do_bench", "cudagraph"), help="(GPU) timer")
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args()
    args.configs = [tuple(int(x) for x in text.split(",")) for text in args.configs]
    if args.compile_only:
        raise SystemExit(compile_only(args))
    gpu_main(args)


if __name__ == "__main__":
    main()
