"""Fused block-sparse attention (forward) in Triton, and the ``li::block_sparse_attention`` op.

Reads top to bottom: the kernel (``_attention_kernel`` and its inner loop ``_visit_blocks``), its
launch configurations (autotuned on CUDA), the tensor-argument launcher ``launch`` (what
``li::planned_attention`` calls) and its op ``li::block_sparse_attention`` (``custom_op`` + fake, so
``torch.compile(fullgraph=True)`` traces it), and the layout-level entry point
``sparse_attention(q, k, v, layout)``.

One program computes ``BLOCK_M`` query rows of one (batch, head). It walks the key blocks that the
layout lists for its query block, in two passes: *full* blocks with no element mask (the fast path)
and *partial* blocks under the token-level ``key_keep`` vector. The site's own mask (bool or
additive, broadcastable to (B, H, Lq, Lk)) and the causal mask (top-left aligned, as SDPA's) apply
to both. Softmax is online, in fp32, in base 2. A query row that sees no key returns zeros.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import triton
import triton.language as tl

from li_compile.kernels.block_layout import (
    BlockLayout, cdiv, check_sizes, validate_indices, validate_unique, whole_number,
)

LOG2E = 1.4426950408889634
MIN_DOT = 16  # smallest M/N/K tl.dot takes on the GPU


class UnsupportedAttention(ValueError):
    """The kernel cannot run this call (shape, block size, dtype); callers may fall back to SDPA."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# -- the kernel -----------------------------------------------------------------------------------


@triton.jit
def _visit_blocks(
    acc, m_i, l_i, q,
    K_base, V_base, stride_kn, stride_vn, k_desc, v_desc,
    count, idx_ptr, first_block, kv_blocks, skip_lo, skip_hi,
    keep_ptr, mask_base, stride_mask_n,
    offs_m, offs_n, offs_d, offs_dv,
    Lq, Lk, D, DV, block_k, qk_scale,
    CONTIGUOUS: tl.constexpr, APPLY_KEEP: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, SUBS: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    """Online softmax over ``count`` key blocks, each cut into ``SUBS`` tiles of BLOCK_N: the blocks
    listed at ``idx_ptr``, or (``CONTIGUOUS``) the run ``first_block, first_block + 1, ...``.

    A listed index outside [0, kv_blocks), or inside the span [skip_lo, skip_hi) that another pass
    covers, is skipped: its loads are masked off (never out of bounds) and its probabilities are zero."""
    NEEDS_MASK: tl.constexpr = (not EVEN_N) or APPLY_KEEP or MASK_KIND != 0 or IS_CAUSAL
    # unscaled logits on the unmasked path: a positive scale commutes with the row max, and the scale
    # and the shift fuse into one multiply-add per element (as in Triton's fused attention)
    FOLD: tl.constexpr = FOLD_SCALE and not NEEDS_MASK
    for j in range(count * SUBS):
        # one flat loop over (listed block, sub-tile), so that the compiler pipelines the loads
        sub_start = (j % SUBS) * BLOCK_N
        if CONTIGUOUS:
            block = first_block + j // SUBS
            live = block >= 0  # always: a run the launcher bounded
        else:
            block = tl.load(idx_ptr + j // SUBS)
            live = (block >= 0) & (block < kv_blocks) & ((block < skip_lo) | (block >= skip_hi))
            block = tl.where(live, block, 0)  # a bad index reads nothing (masked) from block 0's address
        cols = block * block_k + sub_start + offs_n
        # (a vector compare, not `& live`: the interpreter mistypes a vector & scalar bool)
        live_cols = offs_n < tl.where(live, BLOCK_N, 0)
        if EVEN_N:  # every block whole and tiled exactly: no bounds checks on keys
            in_bounds = live_cols
        else:  # ragged last block, or a padded tile wider than a (non power of two) block
            in_bounds = (cols < Lk) & (sub_start + offs_n < block_k) & live_cols
        if EVEN_D:  # a mask constant along the head dim: the loads vectorise, and so can run asynchronously
            k_mask = in_bounds[:, None]
            v_mask = in_bounds[:, None]
        else:
            k_mask = in_bounds[:, None] & (offs_d[None, :] < D)
            v_mask = in_bounds[:, None] & (offs_dv[None, :] < DV)
        if APPLY_KEEP:
            # dropped keys' values are never read: 0 * (NaN or Inf garbage in a cache slot) would poison the row
            keep = tl.load(keep_ptr + cols, mask=in_bounds, other=0) != 0
            v_mask = v_mask & keep[:, None]
        if USE_TMA and not APPLY_KEEP:
            # Hopper's tensor memory accelerator: one bulk copy per tile, rows past Lk read as zeros.
            # A skipped index reads block 0 (in bounds); its probabilities are zero.
            k = k_desc.load([block * block_k + sub_start, 0])
            v = v_desc.load([block * block_k + sub_start, 0])
        elif CONTIGUOUS and EVEN_N and EVEN_D and not APPLY_KEEP:
            k = tl.load(K_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(V_base + cols[:, None] * stride_vn + offs_dv[None, :])
        else:
            k = tl.load(K_base + cols[:, None] * stride_kn + offs_d[None, :], mask=k_mask, other=0.0)
            v = tl.load(V_base + cols[:, None] * stride_vn + offs_dv[None, :], mask=v_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if not FOLD:
            qk = qk * qk_scale  # base-2 logits
        if NEEDS_MASK:
            visible = in_bounds[None, :] & (offs_m[:, None] < Lq)
            if APPLY_KEEP:
                visible = visible & keep[None, :]
            if IS_CAUSAL:  # top-left aligned, as SDPA's is_causal
                visible = visible & (offs_m[:, None] >= cols[None, :])
            if MASK_KIND == 1:  # bool site mask, True = attend
                site = tl.load(mask_base + cols[None, :] * stride_mask_n, mask=visible, other=0)
                visible = visible & (site != 0)
            if MASK_KIND == 2:  # additive site mask, scaled into base 2 like the logits
                bias = tl.load(mask_base + cols[None, :] * stride_mask_n, mask=visible, other=0.0)
                qk = qk + bias.to(tl.float32) * 1.4426950408889634
            qk = tl.where(visible, qk, float("-inf"))
        # a skipped block adds nothing: its row maxima are -inf and its shift +inf (per row, not per element)
        dead = tl.where(live, 0.0, float("inf"))
        if FOLD:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale - dead)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) - dead)
        # a row that has seen no key yet keeps m = -inf: subtract 0 there, so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if FOLD:
            p = tl.math.exp2(qk * qk_scale - (m_safe + dead)[:, None])
        else:
            p = tl.math.exp2(qk - (m_safe + dead)[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Integer arguments that change with a model's capacity bucket (sequence lengths, layout capacities
# and the strides they set, the dense span) but never address a vectorised load: Triton would build
# one binary per divisibility pattern of them (HY full's 0.75 bucket, 19 frames of 1560 tokens, is the
# only one whose Lk is not a multiple of 16); unspecialised, every bucket shares one build per code path.
# The Q/K/V/output strides stay specialised: their multiples of 16 let loads and stores vectorise.
BUCKET_SCALARS = (
    "stride_nb", "stride_nh", "stride_nq", "stride_ib", "stride_ih", "stride_iq",
    "stride_fnb", "stride_fnh", "stride_fnq", "stride_fib", "stride_fih", "stride_fiq",
    "stride_keep_b", "stride_fkeep_b", "stride_slb", "stride_slk", "stride_slg",
    "Lq", "Lk", "capacity", "full_capacity", "span_lo", "span_hi",
)


@triton.jit(do_not_specialize=BUCKET_SCALARS)
def _attention_kernel(
    Q, K, V, Out,
    NUM, IDX, FULL_NUM, FULL_IDX, KEEP, FULL_KEEP, MASK, SEED_O, SEED_LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_fnb, stride_fnh, stride_fnq,
    stride_fib, stride_fih, stride_fiq,
    stride_keep_b, stride_fkeep_b,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sob, stride_sok, stride_sog, stride_som,
    stride_slb, stride_slk, stride_slg, stride_slm,
    H, GROUP, Lq, Lk, D, DV, block_q, block_k, qk_scale,
    capacity, full_capacity, span_lo, span_hi, q_class,
    HAS_FULL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_FULL_KEEP: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    HAS_SEED: tl.constexpr, SPAN_PASS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUBS: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, FOLD_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """One program: BLOCK_M query rows of one (batch, head), over the key blocks its layout lists,
    plus the dense key-block span [span_lo, span_hi): visited here (``SPAN_PASS``) or already reduced
    by flash into a seed (``HAS_SEED``: its output and log-sum-exp start the online softmax)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit batch/head offsets: B * H * L * D passes 2**31 elements at a few dozen video sequences
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP  # GQA: GROUP query heads share one key/value head
    start_m = pid_m * BLOCK_M
    qb = start_m // block_q  # BLOCK_M divides block_q: one layout query block per program
    kv_blocks = tl.cdiv(Lk, block_k)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    K_base = K + b * stride_kb + h_kv * stride_kh
    V_base = V + b * stride_vb + h_kv * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh + offs_m[:, None].to(tl.int64) * stride_mm
    if USE_TMA:  # this (batch, key head)'s keys and values as 2-D TMA descriptors (needs EVEN_D)
        k_desc = tl.make_tensor_descriptor(K_base, shape=[Lk, BLOCK_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V_base, shape=[Lk, BLOCK_DV], strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_DV])
    else:
        k_desc = K_base
        v_desc = V_base

    if HAS_SEED:
        # flash's partial over the span: normalised output o and natural-log lse per row. As online
        # softmax state that is m = lse (base 2), l = 1, acc = o; a row flash saw nothing of has lse = -inf.
        g = h % GROUP
        lse = tl.load(SEED_LSE + b * stride_slb + h_kv * stride_slk + g * stride_slg + offs_m * stride_slm,
                      mask=row_ok, other=float("-inf"))
        m_i = lse * 1.4426950408889634
        l_i = tl.where(lse == float("-inf"), 0.0, 1.0)
        seed_ptrs = (SEED_O + b * stride_sob + h_kv * stride_sok + g * stride_sog
                     + offs_m[:, None] * stride_som + offs_dv[None, :])
        seed_rows = row_ok[:, None] & (l_i[:, None] > 0)
        acc = tl.load(seed_ptrs, mask=seed_rows if EVEN_D else seed_rows & (offs_dv[None, :] < DV), other=0.0)
        acc = acc.to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if SPAN_PASS:  # the dense span, contiguous blocks, no layout mask (site and causal masks apply)
        acc, m_i, l_i = _visit_blocks(
            acc, m_i, l_i, q, K_base, V_base, stride_kn, stride_vn, k_desc, v_desc,
            span_hi - span_lo, NUM, span_lo, kv_blocks, 0, 0,
            FULL_KEEP + b * stride_fkeep_b, mask_base, stride_mn,
            offs_m, offs_n, offs_d, offs_dv, Lq, Lk, D, DV, block_k, qk_scale,
            True, HAS_FULL_KEEP, MASK_KIND, IS_CAUSAL, EVEN_N, EVEN_D, SUBS, BLOCK_N, INPUT_PRECISION, USE_TMA,
            FOLD_SCALE,
        )
    if HAS_FULL:  # full blocks: no layout mask there
        count = tl.load(FULL_NUM + b * stride_fnb + h * stride_fnh + qb * stride_fnq)
        acc, m_i, l_i = _visit_blocks(
            acc, m_i, l_i, q, K_base, V_base, stride_kn, stride_vn, k_desc, v_desc,
            tl.minimum(tl.maximum(count, 0), full_capacity),  # a bad count never walks past the list
            FULL_IDX + b * stride_fib + h * stride_fih + qb * stride_fiq, 0, kv_blocks, span_lo, span_hi,
            FULL_KEEP + b * stride_fkeep_b, mask_base, stride_mn,
            offs_m, offs_n, offs_d, offs_dv, Lq, Lk, D, DV, block_k, qk_scale,
            False, HAS_FULL_KEEP, MASK_KIND, IS_CAUSAL, EVEN_N, EVEN_D, SUBS, BLOCK_N, INPUT_PRECISION, USE_TMA,
            FOLD_SCALE,
        )
    count = tl.load(NUM + b * stride_nb + h * stride_nh + qb * stride_nq)
    acc, m_i, l_i = _visit_blocks(
        acc, m_i, l_i, q, K_base, V_base, stride_kn, stride_vn, k_desc, v_desc,
        tl.minimum(tl.maximum(count, 0), capacity),
        IDX + b * stride_ib + h * stride_ih + qb * stride_iq, 0, kv_blocks, span_lo, span_hi,
        KEEP + b * stride_keep_b, mask_base, stride_mn,
        offs_m, offs_n, offs_d, offs_dv, Lq, Lk, D, DV, block_k, qk_scale,
        False, HAS_KEEP, MASK_KIND, IS_CAUSAL, EVEN_N, EVEN_D, SUBS, BLOCK_N, INPUT_PRECISION, USE_TMA,
        FOLD_SCALE,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no visible key has acc = 0: output 0
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        # whole head dims: a per-row mask, constant along d, so the stores vectorise
        tl.store(o_ptrs, out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] if EVEN_D else row_ok[:, None] & (offs_dv[None, :] < DV))


# -- launch configurations -------------------------------------------------------------------------

# Tiles derived from the (autotuned) BLOCK_M / BLOCK_N: a layout key block is SUBS tiles of BLOCK_N,
# or one padded tile when block_k is not a power of two.
_TILE_HEURISTICS = {
    "SUBS": lambda a: max(1, a["block_k"] // a["BLOCK_N"]),
    "EVEN_M": lambda a: a["Lq"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["Lk"] % a["block_k"] == 0 and a["block_k"] % a["BLOCK_N"] == 0,
    "FOLD_SCALE": lambda a: a["qk_scale"] > 0,
}
# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on CUDA, each with pointer loads and (Hopper) with
# TMA descriptor loads; Triton caches the best per ``AUTOTUNE_KEY`` (`benchmarks/kernel_configs.py`
# times each alone). bf16/fp16 at head dim 128 on H100/H200: 128-row query tiles with 64-key tiles
# and 4 warps won every benchmark shape, 64x64 tiles every end-to-end tuning on an H100, 128x128 tiles
# with 8 warps came 3-18% behind. Kept short: every config is built (in parallel,
# ``_compile_candidates``) and timed once per key at warm-up (8 warps at 64-key tiles, 64x128 tiles
# and a fourth stage, 5-40% slower everywhere, left).
CUDA_CONFIGS = [
    (128, 128, 8, 2),
    (128, 64, 4, 3),
    (128, 64, 4, 2),  # the fastest plain-load config alone on the H200 (benchmarks/results/kernel_configs.md)
    (64, 64, 4, 3),
    (64, 64, 4, 2),  # fits fp32 at head dim 128
]
SMALL_BLOCK_CONFIGS = [(32, 32, 4, 2), (16, 16, 4, 2)]  # only for layouts whose blocks the above do not tile
# What the autotuner keys its choice on (Triton adds every tensor argument's dtype): the heads, the
# head dims, the layout's blocks, the site and causal masks and the query count's size class
# (``q_class``, from ``q_size_class``), not the exact sequence lengths, whether the layout has key
# padding or full blocks, nor how the dense span runs (visited here, seeded by flash, or absent: one
# inner loop, a different prologue). A model's capacity buckets (one Lk each; HY full's Lq of
# 21840-37440 are one class), its unmasked full context and its code paths (Matrix-Game's context
# pass and chunk steps) then share one tuning: its configs compile and time once, and the other shapes
# and paths compile the winner alone (on an H100 at HY full, 54 blocks, light_interaction's cold
# warm-up went from 52 to 31 s with the buckets sharing one tuning).
AUTOTUNE_KEY = ("H", "GROUP", "D", "DV", "block_q", "block_k", "MASK_KIND", "IS_CAUSAL", "INPUT_PRECISION", "q_class")


def q_size_class(q_len: int) -> int:
    """floor(log4(q_len)): query counts in one [4**k, 4**(k+1)) range tune together (the grid's size,
    what decides between 64- and 128-row query tiles, changes little within it); a call within
    ``NEIGHBOUR_RATIO`` of one tuned in the next range takes its choice (``_adopt_neighbour_choice``)."""
    return (q_len.bit_length() - 1) // 2


INTERPRETER_TILE = 64  # the interpreter takes one config: BLOCK_M/BLOCK_N at most this
CAPTURE_CONFIG = (128, 64, 4, 3)  # the autotuned winner at every H100 benchmark shape (bf16, D=128)


def shared_memory_bytes(block_m: int, block_n: int, stages: int, block_d: int, block_dv: int, elem: int) -> int:
    """An upper bound on the shared memory one program of a config takes: its query tile, ``stages``
    buffered key and value tiles, and one tile of scratch for layout conversions. Triton on an H200
    asked for exactly the first two for fp32 128x128 tiles, 3 stages, head dim 128 (458752 bytes),
    and for them plus a 64x128 fp32 tile with 64x64 tiles (262144), so the scratch is counted always."""
    buffers = block_m * block_d + stages * block_n * (block_d + block_dv)
    scratch = max(block_m, block_n) * max(block_d, block_dv)
    return elem * (buffers + scratch)


def _shared_memory_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device``, as Triton checks it at launch."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]


def fitting_configs(configs: list[tuple[int, int, int, int]], block_q: int, block_k: int,
                    memory: Callable[[int, int, int], int], limit: int) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, warps, stages) configs that tile the layout's blocks (BLOCK_M divides
    block_q, BLOCK_N divides block_k) and whose ``memory(m, n, stages)`` fits ``limit``; the small-block
    configs only where no regular one fits. Raises UnsupportedAttention when none fits."""
    tiling = [c for c in configs if block_q % c[0] == 0 and block_k % c[1] == 0]
    fitting = [c for c in tiling if memory(c[0], c[1], c[3]) <= limit]
    regular = [c for c in fitting if min(c[0], c[1]) >= 64]
    if not fitting:
        raise UnsupportedAttention(
            f"no kernel tile divides blocks {block_q}x{block_k} within {limit} bytes of shared memory"
        )
    return regular or fitting


def _config_tuple(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _prune(configs, named_args, **kwargs):
    """Autotuning candidates: the configs ``fitting_configs`` keeps for this call's blocks, head dims,
    dtype and device."""
    q = named_args["Q"]
    dims = [_next_pow2(max(named_args[n], MIN_DOT)) for n in ("D", "DV")]
    memory = partial(_tile_memory, dims=dims, elem=q.element_size())
    keep = set(fitting_configs([_config_tuple(c) for c in configs], named_args["block_q"], named_args["block_k"],
                               memory, _shared_memory_limit(q.device)))
    return [c for c in configs if _config_tuple(c) in keep]


def _tile_memory(m: int, n: int, stages: int, dims: list[int], elem: int) -> int:
    return shared_memory_bytes(m, n, stages, dims[0], dims[1], elem)


@dataclass
class _Kernels:
    """The launchable kernels, built once: ``fixed`` takes explicit tiles (interpreter, CUDA graph
    capture); ``tuned`` autotunes over ``CUDA_CONFIGS`` with plain pointer loads, ``tuned_tma`` over
    the same configs with TMA descriptor loads (Hopper). ``tma_failure`` says why TMA is off: it is
    tried on the first eligible call and, if Triton cannot build or run it, never again."""

    fixed: Callable
    tuned: Callable
    tuned_tma: Callable | None
    tma_failure: str | None
    launched: set = field(default_factory=set)  # call keys launched already (GPU: autotuned, a capture may reuse them)
    first_launch_s: float = 0.0  # host seconds in the first launch of each call key (GPU: compiles, autotuning)
    parallel_compile_failure: str | None = None  # why configs are no longer built in parallel before a tuning
    tuned_q_len: dict = field(default_factory=dict)  # tuning key -> the query count it was tuned at here


def _build_kernels() -> _Kernels:
    """The kernels for this process (autotuning needs a GPU: the interpreter gets the fixed kernel).
    Each tuning's timings persist in Triton's cache directory (``TRITON_CACHE_DIR``), keyed by the
    kernel's source, the GPU target, Triton's version, the ``AUTOTUNE_KEY`` values and the candidate
    configs: a later process on the same machine reuses the choice and times nothing."""
    fixed = triton.heuristics(_TILE_HEURISTICS)(_attention_kernel)
    if _interpreting():
        return _Kernels(fixed, fixed, None, "the interpreter runs one fixed config")

    def autotuned(use_tma: bool):
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "USE_TMA": use_tma}, num_warps=w, num_stages=s)
            for m, n, w, s in CUDA_CONFIGS + SMALL_BLOCK_CONFIGS
        ]
        return triton.autotune(configs, key=list(AUTOTUNE_KEY), prune_configs_by={"early_config_prune": _prune},
                               do_bench=_time_config, cache_results=True)(fixed)

    failure = _tma_unavailable()
    return _Kernels(fixed, autotuned(False), None if failure else autotuned(True), failure)


# How long the autotuner runs each candidate config before and while timing it (ms of launches).
# Triton's default, 25 + 100 ms, took 0.15 s a config at warm-up (H100, Matrix-Game full: 1.0 s of a
# 3.6 s first launch). The configs it separates differ by 2-40% (`benchmarks/results/kernel_configs.md`),
# which 20 ms of launches resolve (40 of a 0.5 ms call, after do_bench's own 5-launch estimate); a
# near tie (within 1%: 128x64 tiles at 2 or 3 stages) may go either way, at no cost that matters.
TUNING_MS = (5, 20)


def _time_config(kernel_call: Callable[[], None], quantiles) -> list[float]:
    """The autotuner's benchmark: Triton's ``do_bench`` over ``TUNING_MS``."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=TUNING_MS[0], rep=TUNING_MS[1], quantiles=quantiles)


def _tma_unavailable() -> str | None:
    """Why device-side TMA descriptors cannot run here (None: they may): they need a Hopper or newer
    GPU, ``tl.make_tensor_descriptor`` and Triton's scratch allocator hook. ``LI_KERNEL_TMA=0`` in the
    environment turns them off (to time the plain variant against them)."""
    if os.environ.get("LI_KERNEL_TMA", "1") == "0":
        return "turned off by LI_KERNEL_TMA=0"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return "TMA needs compute capability 9.0 or newer"
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor"
    try:
        from triton.runtime._allocation import _allocator  # noqa: F401
    except ImportError:
        return f"Triton {triton.__version__} has no scratch allocator hook"
    return None


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for device-side TMA descriptors, from torch's caching allocator (graph-safe)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch_tma(kernel, grid, args, flags) -> None:
    """Launch a TMA kernel with Triton's scratch allocator set for this launch only (a context
    variable, reset after: no process-wide setting)."""
    from triton.runtime._allocation import _allocator

    token = _allocator.set(_tma_scratch)
    try:
        kernel[grid](*args, **flags)
    finally:
        _allocator.reset(token)


_KERNELS: _Kernels | None = None


def _kernels() -> _Kernels:
    """The launchable kernels, built on first use (after TRITON_INTERPRET is settled)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build_kernels()
    return _KERNELS


def launched_shapes() -> int:
    """How many distinct call shapes (sizes, dtypes and constexpr flags) the kernel has launched in
    this process, in the interpreter too. On the GPU a new one may compile a kernel, and the first of
    an ``AUTOTUNE_KEY`` times every config (seconds): a count that grows while a trajectory is timed
    means warm-up missed a shape."""
    return 0 if _KERNELS is None else len(_KERNELS.launched)


def first_launch_seconds() -> float:
    """Host seconds this process spent in the first launch of each call shape ``launched_shapes``
    counts: on the GPU, Triton compiling and the autotuner timing its configs (what the kernel adds
    to a model's warm-up); in the interpreter, running the call."""
    return 0.0 if _KERNELS is None else _KERNELS.first_launch_s


def tuned_configs() -> dict[str, str]:
    """The config each tuning in this process chose, by its key: ``"H=24 ... q_class=6 (tma)"`` ->
    ``"128x64, warps 4, stages 2"`` (BLOCK_M x BLOCK_N). Empty before the first tuning, and in the
    interpreter (which never tunes)."""
    if _KERNELS is None or _interpreting():
        return {}
    chosen = {}
    for tuner, name in ((_KERNELS.tuned, "plain"), (_KERNELS.tuned_tma, "tma")):
        for key, config in ({} if tuner is None else tuner.cache).items():
            named = " ".join(f"{k}={v}" for k, v in zip(AUTOTUNE_KEY, key))
            chosen[f"{named} ({name})"] = "{}x{}, warps {}, stages {}".format(*_config_tuple(config))
    return chosen


def kernel_variant() -> str:
    """Which Triton variant launches run: "tma" (Hopper descriptor loads) or "plain (<why not tma>)"."""
    kernels = _kernels()
    return "tma" if kernels.tuned_tma is not None else f"plain ({kernels.tma_failure})"


def _fixed_launch(block_q: int, block_k: int, interpreting: bool,
                  memory: Callable[[int, int, int], int] | None = None, limit: int = 0) -> dict:
    """Explicit tiles and launch settings for a call that cannot autotune: the interpreter (one
    config), and CUDA graph capture (timing configs inside a capture fails), where the config that
    won every H100 benchmark shape is used, or else the first regular config that tiles the blocks
    and fits ``limit`` bytes of shared memory by ``memory(m, n, stages)``."""
    if interpreting:
        return dict(BLOCK_M=_pow2_divisor(block_q, INTERPRETER_TILE), BLOCK_N=_interpreter_block_n(block_k))
    memory = memory or (lambda m, n, stages: 0)
    candidates = [CAPTURE_CONFIG] + CUDA_CONFIGS + SMALL_BLOCK_CONFIGS
    m, n, w, s = fitting_configs(candidates, block_q, block_k, memory, limit)[0]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n``, at most ``cap``."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


# -- the op -----------------------------------------------------------------------------------------


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    key_keep: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    block_q: int,
    block_k: int,
    scale: float | None,
    is_causal: bool,
) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) that visits only the
    listed key blocks (the BCSR tensors of ``BlockLayout``), under the optional site mask
    ``attn_mask`` (broadcastable to (B, H, Lq, Lk); bool True = attend, or additive) and
    ``is_causal`` (top-left aligned, as SDPA's). Returns (B, H, Lq, Dv) in q's dtype; rows that see
    no key are zeros. Raises ``UnsupportedAttention`` for a call the kernel cannot run.

    The plain launcher behind the ``li::block_sparse_attention`` op: code that already runs inside a
    custom op (``li::planned_attention``) or in eager inference calls it directly, saving a dispatch."""
    return launch_split(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep,
                        attn_mask, block_q, block_k, scale, is_causal)


def launch_split(
    q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, attn_mask,
    block_q: int, block_k: int, scale: float | None, is_causal: bool,
    span: tuple[int, int] = (0, 0),
    seed: tuple[torch.Tensor, torch.Tensor] | None = None,
    siblings: Callable[[], list["KernelCall"]] | None = None,
) -> torch.Tensor:
    """``launch`` plus a dense key-block span ``span = (first, end)`` (block_k units) that every query
    row sees whole; listed blocks inside it are skipped. Without ``seed`` the kernel visits the span
    itself (site and causal masks apply). With ``seed = (o, lse)``, flash's partial over the span
    (o: (B, Hkv, G, Lq, Dv) in q's dtype, lse: (B, Hkv, G, Lq) fp32 natural log, G = H // Hkv; any
    strides, last dim of o contiguous) starts the online softmax, and the output is the merge.

    ``siblings``: the calls (``prepare_call``) the same model will make later with other code paths
    (its unpadded full context): asked for only when this call starts a tuning, whose candidate
    configs are then built for them too, in the same parallel builds (``_compile_candidates``)."""
    call = prepare_call(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep,
                        attn_mask, block_q, block_k, scale, is_causal, span, seed)
    kernels = _kernels()
    interpreting = _interpreting()
    args, flags, grid, use_tma = call.args, call.flags, call.grid, call.use_tma
    q = args[0]
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    call_key = call.key
    first_launch, start = call_key not in kernels.launched, time.perf_counter()
    if first_launch and not (interpreting or capturing):  # the autotuner may time configs: build them first
        autotuner = kernels.tuned_tma if use_tma else kernels.tuned
        if not _adopt_neighbour_choice(kernels, autotuner, call):
            _compile_candidates(kernels, autotuner, call, siblings)
    if interpreting or (capturing and first_launch):
        # no timing possible (interpreter, or a CUDA graph capture of a shape never tuned): fixed tiles
        memory = partial(_tile_memory, dims=[flags["BLOCK_D"], flags["BLOCK_DV"]], elem=q.element_size())
        limit = 0 if interpreting else _shared_memory_limit(q.device)
        tiles = _fixed_launch(block_q, block_k, interpreting, memory, limit)
        if use_tma:
            _launch_tma(kernels.fixed, grid, args, {**flags, **tiles, "USE_TMA": True})
        else:
            kernels.fixed[grid](*args, **flags, **tiles)
    elif use_tma:
        try:  # a capture of a tuned shape replays the tuned winner: the autotuner times nothing then
            _launch_tma(kernels.tuned_tma, grid, args, flags)
        except Exception as failure:  # Triton could not build or run it here: plain loads from now on
            if capturing:
                raise
            kernels.tuned_tma, kernels.tma_failure = None, f"TMA failed: {type(failure).__name__}: {str(failure)[:200]}"
            kernels.tuned[grid](*args, **flags)
            call_key = (*call_key[:10], False, *call_key[11:])
    else:
        kernels.tuned[grid](*args, **flags)
    if first_launch:
        kernels.first_launch_s += time.perf_counter() - start
    kernels.launched.add(call_key)
    out = args[3]
    return out if out.dtype == call.out_dtype else out.to(call.out_dtype)


@dataclass(frozen=True)
class KernelCall:
    """One launch as Triton sees it: the kernel's positional ``args`` (inputs already as the kernel
    reads them, the output allocated), its constexpr ``flags``, the ``grid``, whether it loads by TMA,
    the result's dtype and the ``key`` telling its call shape apart (``launched_shapes``)."""

    args: tuple
    flags: dict
    grid: Callable
    use_tma: bool
    out_dtype: torch.dtype
    key: tuple


def prepare_call(
    q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, attn_mask,
    block_q: int, block_k: int, scale: float | None, is_causal: bool,
    span: tuple[int, int] = (0, 0),
    seed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> KernelCall:
    """The launch ``launch_split`` makes of these arguments (checked, as there), without running it:
    the output is allocated, nothing is built or launched."""
    check_call(q, k, v, block_q, block_k)
    check_layout(q, k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, block_q, block_k)
    check_scale(scale)
    # the kernel reads each index row and the keep vector with unit stride (only leading strides are passed)
    kv_indices, full_kv_indices, key_keep = (
        t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (kv_indices, full_kv_indices, key_keep))
    B, H, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    check_site_mask(attn_mask, (B, H, Lq, Lk))
    span = check_span(span, Lk, block_k)
    if seed is not None and span[0] == span[1]:
        raise ValueError(f"a flash seed needs a non-empty span, got span {span}")
    out_dtype = q.dtype
    if _interpreting() and q.dtype == torch.bfloat16:
        # the interpreter's bf16 arithmetic is wrong (COMPILE-NOTES): compute in fp32, round at the end
        q, k, v = q.float(), k.float(), v.float()
        seed = None if seed is None else (seed[0].float(), seed[1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((B, H, Lq, DV), dtype=q.dtype, device=q.device)

    keep, full_keep, attn_mask = _fold_key_padding(key_keep, attn_mask, Lk)
    mask_kind, mask, mask_strides = _site_mask(attn_mask, (B, H, Lq, Lk), kv_num_blocks)
    has_full = full_kv_num_blocks is not None
    full_num = full_kv_num_blocks if has_full else kv_num_blocks  # stand-ins are never read
    full_idx = full_kv_indices if has_full else kv_indices
    stand_in = out.view(torch.uint8)  # never read; a byte tensor, so every call's key dtypes agree (autotune key)
    keep_t = keep.view(torch.uint8) if keep is not None else stand_in
    full_keep_t = full_keep.view(torch.uint8) if full_keep is not None else stand_in
    # never-read stand-ins of the seed's dtypes (views, no allocation), so every call's key dtypes agree
    seed_o, seed_lse = seed if seed is not None else (out, kv_num_blocks.view(torch.float32))
    seed_strides = (*_seed_strides(seed_o, 4), *_seed_strides(seed_lse, 4)) if seed is not None else (0,) * 8
    block_d, block_dv = (_next_pow2(max(n, MIN_DOT)) for n in (D, DV))
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    args = (
        q, k, v, out, kv_num_blocks, kv_indices, full_num, full_idx, keep_t, full_keep_t, mask, seed_o, seed_lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *_lead_strides(kv_num_blocks), *_lead_strides(kv_indices),
        *_lead_strides(full_num), *_lead_strides(full_idx),
        _lead_strides(keep_t, 1)[0] if keep is not None else 0,
        _lead_strides(full_keep_t, 1)[0] if full_keep is not None else 0,
        *mask_strides, *seed_strides,
        H, H // Hkv, Lq, Lk, D, DV, block_q, block_k, scale * LOG2E,
        kv_indices.shape[-1], full_idx.shape[-1], *span, q_size_class(Lq),
    )
    flags = dict(
        HAS_FULL=has_full, HAS_KEEP=keep is not None, HAS_FULL_KEEP=full_keep is not None,
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, EVEN_D=D == block_d and DV == block_dv,
        HAS_SEED=seed is not None, SPAN_PASS=seed is None and span[0] < span[1],
        BLOCK_D=block_d, BLOCK_DV=block_dv, INPUT_PRECISION=_dot_precision(q),
    )
    kernels = _kernels()
    grid = lambda meta: (cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    use_tma = kernels.tuned_tma is not None and _tma_eligible(q, k, v, flags)
    key = (B, H, Lq, Lk, D, DV, Hkv, block_q, block_k, q.dtype, use_tma,
           *(v for v in flags.values()), *(t.dtype for t in args if isinstance(t, torch.Tensor)))
    return KernelCall(args, flags, grid, use_tma, out_dtype, key)


def _compile_candidates(kernels: _Kernels, autotuner, call: KernelCall,
                        siblings: Callable[[], list[KernelCall]] | None = None) -> None:
    """Build every config ``autotuner`` is about to time for ``call``, in parallel threads (Triton's
    ``AsyncCompileMode``), so that its timing loop finds them built: one after the other, building
    and timing the five Hopper configs took 7.5-10 s of a cold warm-up on an H100. The same configs
    are built for each of ``siblings()`` (later calls of another code path that share this tuning) in
    the same threads, where the host has a core for each build: whichever config wins, its build for
    them is then ready, where otherwise each would build it alone at its first call (0.9-1.4 s on an
    H100). Nothing is built (and
    ``siblings`` is not called) when the autotuner has this call's key already (its choice is then
    built alone, as before). A config that fails to build here is built again by the autotuner, as
    without this step; if the parallel build itself fails, it is not tried again in this process
    (``kernels.parallel_compile_failure`` says why); siblings that cannot be prepared are left out."""
    from triton.runtime._async_compile import AsyncCompileMode, active_mode

    if kernels.parallel_compile_failure is not None or active_mode.get() is not None:
        return
    try:
        if _tuning_key(autotuner, call) in autotuner.cache:
            return
        cores = os.cpu_count() or 1
        calls = [call, *_siblings_of(call, siblings, room=cores // len(autotuner.configs) - 1)]
        workers = min(len(autotuner.configs) * len(calls), cores)
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for each in calls:
                autotuner.warmup(*each.args, grid=each.grid, **each.flags)
    except Exception as failure:
        kernels.parallel_compile_failure = f"{type(failure).__name__}: {str(failure)[:200]}"


def _tuning_key(autotuner, call: KernelCall) -> tuple:
    """The key ``autotuner`` chooses a config by for ``call``, as Triton forms it: the ``AUTOTUNE_KEY``
    values, then every tensor argument's dtype."""
    named = {**dict(zip(autotuner.arg_names, call.args)), **call.flags}
    return (*(named[k] for k in autotuner.keys),
            *(str(v.dtype) for n, v in named.items() if n in autotuner.arg_names and hasattr(v, "dtype")))


NEIGHBOUR_RATIO = 2  # a call this close in query count to a tuned one of the next size class takes its choice


def _adopt_neighbour_choice(kernels: _Kernels, autotuner, call: KernelCall) -> bool:
    """Give an untuned ``call`` the choice of a key tuned in this process that differs only in the
    query count's size class, at a query count within ``NEIGHBOUR_RATIO`` of this call's: a model's
    capacity buckets that straddle a class boundary then tune once (Matrix-Game full's 13200-16720
    queries lie on both sides of 4**7). Returns whether it did; otherwise records this call's query
    count under its key (the autotuner is about to tune it)."""
    key = _tuning_key(autotuner, call)
    if key in autotuner.cache:
        return False
    at = autotuner.keys.index("q_class")
    q_len = dict(zip(autotuner.arg_names, call.args))["Lq"]
    for other, tuned_len in kernels.tuned_q_len.items():
        if (other in autotuner.cache and other[:at] + other[at + 1:] == key[:at] + key[at + 1:]
                and max(q_len, tuned_len) <= NEIGHBOUR_RATIO * min(q_len, tuned_len)):
            autotuner.cache[key] = autotuner.cache[other]
            return True
    kernels.tuned_q_len[key] = q_len
    return False


def _siblings_of(call: KernelCall, siblings: Callable[[], list[KernelCall]] | None, room: int) -> list[KernelCall]:
    """The first ``room`` calls of ``siblings()`` that the same autotuner serves as ``call`` (same load
    kind) and that are another call shape; none where preparing them fails (the builds go on without
    them). ``room``: how many more sets of candidates the cores build at once with ``call``'s (on a
    host with fewer cores the siblings would lengthen the tuning's builds by more than they save)."""
    if siblings is None or room < 1:
        return []
    try:
        prepared = siblings()
    except Exception:  # noqa: BLE001 - a sibling is a guess at a later call: without it that call builds alone
        return []
    return [s for s in prepared if s.use_tma == call.use_tma and s.key != call.key][:room]


def _tma_eligible(q, k, v, flags) -> bool:
    """TMA descriptors need whole power-of-two head dims and 16-byte aligned bases and row strides."""
    if not flags["EVEN_D"]:
        return False
    elem = k.element_size()
    for t in (k, v):
        if t.data_ptr() % 16 or any((st * elem) % 16 for st in t.stride()[:3]):
            return False
    return True


def check_span(span, kv_len: int, block_k: int) -> tuple[int, int]:
    """``span`` as (first, end) key blocks, ints within [0, cdiv(kv_len, block_k)]; ValueError
    otherwise (``block_k`` first: a positive int)."""
    check_sizes(block_k=block_k)
    kv_blocks = cdiv(kv_len, block_k)
    blocks = [whole_number(b) for b in span]
    if len(blocks) != 2 or None in blocks or not 0 <= blocks[0] <= blocks[1] <= kv_blocks:
        raise ValueError(f"dense span must be (first, end) int key blocks with 0 <= first <= end <= {kv_blocks}, "
                         f"got {tuple(span)}")
    return blocks[0], blocks[1]


def check_scale(scale) -> None:
    """Raise ``ValueError`` unless ``scale`` (of the scores) is None or a finite number: the kernel
    takes it as a constant, not a tensor."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number (a Python float), got {scale!r}")


def _seed_strides(t: torch.Tensor, n: int) -> list[int]:
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(n)]


block_sparse_attention = torch.library.custom_op("li::block_sparse_attention", launch, mutates_args=())


@block_sparse_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, attn_mask, block_q, block_k, scale, is_causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def register_inference_only(op, name: str) -> None:
    """Make the custom op ``op`` (named ``name``) raise a clear error, rather than return a result
    without gradients, when any input requires grad: the attention ops here have no backward."""

    def refuse_gradients(ctx, inputs, output) -> None:
        raise RuntimeError(
            f"{name} is inference-only and got inputs that require grad: "
            "run it under torch.no_grad() or torch.inference_mode()"
        )

    def no_backward(ctx, grad):  # never reached: refuse_gradients raises first
        raise RuntimeError(f"{name} has no backward")

    op.register_autograd(no_backward, setup_context=refuse_gradients)


register_inference_only(block_sparse_attention, "li::block_sparse_attention")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k, v (B, Hkv, Lk, D|Dv) restricted to ``layout`` (a
    ``BlockLayout`` with q_len = Lq, kv_len = Lk), on top of an optional site mask / causal mask."""
    if (layout.q_len, layout.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"layout is for (q_len, kv_len)={(layout.q_len, layout.kv_len)}, got q/k lengths {(q.shape[2], k.shape[2])}"
        )
    args = (
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
        layout.key_keep, attn_mask, layout.block_q, layout.block_k, scale, is_causal,
    )
    needs_op = torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    return block_sparse_attention(*args) if needs_op else launch(*args)  # eager inference: skip the dispatch


# -- argument checks and mask plumbing ------------------------------------------------------------


def check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int) -> None:
    """Raise ``UnsupportedAttention`` naming the first thing the kernel cannot run (``ValueError``
    for block sizes that are not positive ints)."""
    check_sizes(block_q=block_q, block_k=block_k)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UnsupportedAttention(f"q, k, v must be 4-D (B, H, L, D), got {q.dim()}, {k.dim()}, {v.dim()} dims")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise UnsupportedAttention(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise UnsupportedAttention(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if H < 1 or k.shape[1] < 1 or D < 1:
        raise UnsupportedAttention(
            f"q, k, v need at least one head and a head dim >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if H % k.shape[1]:
        raise UnsupportedAttention(f"key/value heads ({k.shape[1]}) must divide query heads ({H})")
    if max(D, v.shape[3]) > 256:
        raise UnsupportedAttention(f"head dims up to 256 are supported, got {D} / {v.shape[3]}")
    if not q.is_cuda and not _interpreting():
        raise UnsupportedAttention(f"the Triton kernel runs on CUDA tensors (or with TRITON_INTERPRET=1), got {q.device}")
    if q.is_cuda and (block_q % MIN_DOT or block_k % MIN_DOT):
        raise UnsupportedAttention(f"on the GPU block sizes must be multiples of {MIN_DOT}, got {block_q}x{block_k}")


def check_layout(q, k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, block_q, block_k) -> None:
    """Raise ``ValueError`` naming the first layout tensor whose shape, dtype or device does not fit the
    call. Index values are checked on the CPU (``validate_indices``, ``validate_unique``); on a GPU checking them would sync,
    and the kernel clamps counts and skips bad indices, so bad values never read out of bounds."""
    B, H, Lq = q.shape[:3]
    Lk = k.shape[2]
    q_blocks = cdiv(Lq, block_q)
    lists = [("kv_num_blocks", kv_num_blocks, "kv_indices", kv_indices)]
    if full_kv_num_blocks is not None or full_kv_indices is not None:
        lists.append(("full_kv_num_blocks", full_kv_num_blocks, "full_kv_indices", full_kv_indices))
    for count_name, counts, index_name, indices in lists:
        for name, t, dims in ((count_name, counts, 3), (index_name, indices, 4)):
            if t is None or t.dim() != dims or t.dtype != torch.int32 or t.device != q.device:
                got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
                raise ValueError(f"{name} must be int32 with {dims} dims on {q.device}, got {got}")
            if t.shape[0] not in (1, B) or t.shape[1] not in (1, H) or t.shape[2] != q_blocks:
                raise ValueError(f"{name} is {tuple(t.shape)}, needs (B|1={B}, H|1={H}, Q={q_blocks}, ...)")
        if indices.shape[:3] != counts.shape:
            raise ValueError(f"{index_name} {tuple(indices.shape)} does not match {count_name} {tuple(counts.shape)}")
        if counts.device.type == "cpu":
            validate_indices(counts, indices, cdiv(Lk, block_k), count_name, index_name)
    if kv_num_blocks.device.type == "cpu":
        validate_unique([(c, i) for _, c, _, i in lists], cdiv(Lk, block_k))
    if key_keep is not None and (
        key_keep.dtype != torch.bool or key_keep.dim() != 2 or key_keep.shape[0] not in (1, B)
        or key_keep.shape[1] != Lk or key_keep.device != q.device
    ):
        raise ValueError(
            f"key_keep must be bool (B|1={B}, Lk={Lk}) on {q.device}, got {key_keep.dtype} {tuple(key_keep.shape)} on {key_keep.device}"
        )


def _dot_precision(q: torch.Tensor) -> str:
    """fp32 inputs: exact products in the interpreter, 3xTF32 on the GPU (fp32-grade, tensor cores;
    plain FMA dots compile for minutes there). Half types: ignored."""
    if q.dtype != torch.float32:
        return "tf32"
    return "ieee" if _interpreting() else "tf32x3"


def _interpreter_block_n(block_k: int) -> int:
    if block_k & (block_k - 1) == 0:
        return min(block_k, INTERPRETER_TILE)
    return _next_pow2(block_k)  # one padded tile per block, columns past block_k masked


def _next_pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python: triton.next_power_of_2 costs microseconds a call)."""
    return 1 << (n - 1).bit_length()


def _lead_strides(t: torch.Tensor, n: int = 3) -> list[int]:
    """Strides of the first ``n`` dims, 0 where the dim has size 1 (broadcast)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(n)]


def folds_key_padding(attn_mask: torch.Tensor | None, kv_len: int) -> bool:
    """Whether ``attn_mask`` is a key-padding mask, bool (B|1, 1, 1, Lk), which the kernel reads as a
    keep vector (``_fold_key_padding``) rather than as a site mask."""
    return (
        attn_mask is not None
        and attn_mask.dtype == torch.bool
        and attn_mask.dim() == 4
        and attn_mask.shape[1:3] == (1, 1)
        and attn_mask.shape[3] == kv_len
    )


def _fold_key_padding(key_keep, attn_mask, kv_len):
    """A bool key-padding site mask (B|1, 1, 1, Lk) becomes a keep vector (the fast path): partial
    blocks read ``key_keep & padding``, full blocks ``padding``. Returns (keep, full_keep, mask)."""
    if not folds_key_padding(attn_mask, kv_len):
        return key_keep, None, attn_mask
    padding = attn_mask[:, 0, 0, :]
    keep = padding if key_keep is None else key_keep & padding
    return keep.contiguous(), padding.contiguous(), None


def check_site_mask(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> None:
    """Raise ``UnsupportedAttention`` for a site mask SDPA refuses too: neither bool (True = attend)
    nor floating (additive), e.g. an integer 0/1 mask, or not broadcastable to ``shape`` (B, H, Lq,
    Lk), e.g. a key-padding mask (B', 1, 1, Lk) whose batch B' is neither 1 nor B."""
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise UnsupportedAttention(f"attn_mask must be bool (True = attend) or floating (additive), got {attn_mask.dtype}")
    if attn_mask.dim() > 4 or any(m not in (1, n) for m, n in zip(reversed(attn_mask.shape), reversed(shape))):
        raise UnsupportedAttention(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk)={shape}")


def _site_mask(attn_mask, shape, stand_in):
    """(kind, tensor, strides (b, h, m, n)) of the site mask (``check_site_mask``-ed): kind 0 none,
    1 bool, 2 additive."""
    if attn_mask is None:
        return 0, stand_in, (0, 0, 0, 0)
    mask = attn_mask.expand(shape)
    strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    if mask.dtype == torch.bool:
        return 1, mask.view(torch.uint8), strides  # same strides, bytes Triton can load
    return 2, mask, strides
