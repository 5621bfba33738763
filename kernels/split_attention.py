"""Dense span through flash, scattered rest through Triton, merged by log-sum-exp: ``li::split_attention``.

A plan's typical layout visits long runs of consecutive key blocks whole (the chunk's own keys, the
recent frames) plus scattered memory tiles. The run is a *dense span* of key blocks, fixed by the
sequence layout and given as static ints (so nothing recompiles). The span runs through SDPA's fused
kernel (cuDNN on the GPU, as ``F.scaled_dot_product_attention`` itself picks on Hopper; flash or the
memory-efficient kernel where cuDNN refuses), which also returns each row's log-sum-exp; the
remainder of the layout runs through the block-sparse Triton kernel.

The merge is fused: the Triton kernel starts its online softmax from flash's partial (m = lse,
l = 1, acc = o) instead of from zero, so its epilogue writes the merged output. Nothing copies Q, K
or V: flash reads K/V's span as a slice (a view) and, under GQA, the query heads that share a
key/value head as one longer query sequence (a view of Q); the only new tensors are flash's partial
output and log-sum-exp, and the result. Where flash cannot run (a site or causal mask, head dims
that differ, a dtype or a query layout it does not take), or on the GPU where the span is too short
for it to pay (``MIN_FLASH_SPAN_WORK``), the Triton kernel visits the span itself.

    split_attention(q, k, v, layout, dense_span)    # the layout-level entry point
    split_layout(layout, dense_span)                # the layout minus the span (what plans should list)
    chunk_span(q_len, kv_len, block_k)              # the span of the chunk's own keys (KV-cache form)
    warm_up(...)                                    # autotune every shape once, before timing
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from li_compile.kernels.block_layout import BlockLayout, cdiv, check_sizes
from li_compile.kernels.block_sparse_attention import (
    KernelCall, check_layout, check_scale, check_span, folds_key_padding, launch_split, prepare_call,
    register_inference_only,
)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
# A span whose Q.K^T work (B * H * Lq * span keys * D multiply-adds) is under this runs in the Triton
# kernel itself on these devices: there flash's second launch and the round trip of its partial
# output cost more than its faster rate saves. H100, bf16, `benchmarks/attention.py`: 24 heads x 3840
# queries over a span of 640 keys (7.5e9) ran 8% faster in Triton alone, 8800 queries over 608 keys
# (1.6e10) 6% slower; 3840 over 1152 (1.4e10) about the same (5.45x through flash against 5.53x for
# Triton alone on a random layout of the same density).
MIN_FLASH_SPAN_WORK = 2**33
SHORT_SPAN_DEVICES = ("cuda",)


def chunk_span(q_len: int, kv_len: int, block_k: int) -> tuple[int, int]:
    """(first, end) key blocks wholly inside the last ``q_len`` keys: the chunk's own keys when the
    queries are the chunk and the keys end with it (KV-cache form). Empty ((K, K)) when no block fits."""
    kv_blocks = cdiv(kv_len, block_k)
    return min(cdiv(max(kv_len - q_len, 0), block_k), kv_blocks), kv_blocks


def split_layout(layout: BlockLayout, dense_span: tuple[int, int]) -> BlockLayout:
    """``layout`` with the blocks of ``dense_span`` (first, end) dropped from both lists: what the
    Triton kernel still has to visit once flash has done the span. Same shapes and capacity (static,
    so it can be copied into a plan slot in place); runs on the layout's device without syncing."""
    first, end = check_span(dense_span, layout.kv_len, layout.block_k)

    def drop(counts: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
        keep = used & ((indices < first) | (indices >= end))
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept entries first, in order
        return keep.sum(-1, dtype=counts.dtype), torch.gather(indices, -1, order)

    full = (None, None) if layout.full_kv_num_blocks is None else drop(layout.full_kv_num_blocks, layout.full_kv_indices)
    return BlockLayout(
        *drop(layout.kv_num_blocks, layout.kv_indices), *full, layout.key_keep,
        layout.block_q, layout.block_k, layout.q_len, layout.kv_len,
    )


def flash_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense_span: tuple[int, int], block_k: int, scale: float
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """Attention of q (B, H, Lq, D) over the keys of ``dense_span`` only, by SDPA's fused kernels:
    ``((o, lse), variant)`` with o (B, Hkv, G, Lq, Dv) in q's dtype and lse (B, Hkv, G, Lq) fp32
    natural log (G = H // Hkv; views of flash's outputs, any strides), or ``(None, reason)`` where no
    fused kernel takes the call. No copy of q, k or v is made (GQA: the G query heads of a key/value
    head are one query sequence of G * Lq rows, a view)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hkv
    if D != DV:
        return None, f"flash needs equal q/v head dims, got {D} and {DV}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None, "flash needs unit-stride head dims"
    if group > 1 and q.stride(1) != Lq * q.stride(2):
        return None, f"GQA query heads are not one sequence per key/value head (strides {q.stride()})"
    rows = q.view(B, Hkv, group * Lq, D) if group > 1 else q  # a view: checked above
    keys = _span_keys(dense_span, block_k, Lk)
    k_span, v_span = k[:, :, keys], v[:, :, keys]  # views
    refusals = []
    for variant in _variants(q):
        try:
            o, lse = _FUSED[variant](rows, k_span, v_span, scale)
        except RuntimeError as refusal:  # a build or GPU without the kernel: try the next one
            refusals.append(f"{variant}: {str(refusal).splitlines()[0]}")
            continue
        # lse may be padded past Lq (the efficient kernel pads to 32 rows) or carry a trailing unit
        # dim (cuDNN's (B, H, L, 1) statistics): read the first group * Lq rows only
        lse = lse.reshape(*lse.shape[:2], -1)[..., : group * Lq]
        return (o.unflatten(2, (group, Lq)), lse.unflatten(2, (group, Lq))), variant
    return None, "fused SDPA refused (" + "; ".join(refusals) + ")"


def _span_keys(dense_span: tuple[int, int], block_k: int, kv_len: int) -> slice:
    """The keys of the key-block span (first, end): the last block may be ragged."""
    return slice(dense_span[0] * block_k, min(dense_span[1] * block_k, kv_len))


def _variants(q: torch.Tensor) -> tuple[str, ...]:
    """SDPA's fused kernels that return a log-sum-exp, fastest first, for q's device and dtype.
    cuDNN leads on the GPU: on Hopper it is what ``F.scaled_dot_product_attention`` itself picks
    (flash-attention 2 runs at about 57% of its rate on an H200)."""
    D = q.shape[-1]
    if not q.is_cuda:
        return ("cpu_flash",)
    if q.dtype in FLASH_DTYPES and D <= FLASH_MAX_HEAD_DIM and D % 8 == 0:
        return ("cudnn", "flash", "efficient")
    return ("efficient",)


# Each: (rows (B, Hq, Lq, D), k, v (B, Hq, Lk, D), scale) -> (o (B, Hq, Lq, D), natural-log lse (B, Hq, Lq[, 1]))
_FUSED = {
    "cudnn": lambda q, k, v, scale: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)[:2],
    "flash": lambda q, k, v, scale: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False, scale=scale)[:2],
    "efficient": lambda q, k, v, scale: torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False, scale=scale)[:2],
    "cpu_flash": lambda q, k, v, scale: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, scale=scale),
}


def attend(
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
    span_first: int = 0,
    span_end: int = 0,
) -> torch.Tensor:
    """The ``li::block_sparse_attention`` call (same arguments, same result) plus the dense key-block
    span [span_first, span_end) that every query row sees whole, on top of the listed blocks (listed
    blocks inside the span count once). Returns (B, H, Lq, Dv) in q's dtype, contiguous.

    The launcher behind ``li::split_attention``; code already inside a custom op calls it directly."""
    out, _ = _attend(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep,
                     attn_mask, block_q, block_k, scale, is_causal, (span_first, span_end))
    return out


def _attend(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, attn_mask,
            block_q, block_k, scale, is_causal, span) -> tuple[torch.Tensor, str]:
    """``attend`` and the name of the path that ran (for benchmarks and reports)."""
    check_sizes(block_q=block_q, block_k=block_k)
    span = check_span(span, k.shape[2], block_k)
    check_scale(scale)
    lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    route, seed, variant = _route(q, k, v, attn_mask, is_causal, span, block_k, scale)
    if route == "sdpa":
        check_layout(q, k, *lists, block_q, block_k)  # the layout is not read, but must be one
        # the span is every key (listed blocks all lie inside it): dense attention is the answer,
        # SDPA's own call, with no log-sum-exp to ask for
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return out.contiguous(), variant
    siblings = None
    if folds_key_padding(attn_mask, k.shape[2]):
        siblings = lambda: _unmasked(q, k, v, lists, block_q, block_k, scale, is_causal, span)  # noqa: E731
    out = launch_split(q, k, v, *lists, attn_mask, block_q, block_k, scale, is_causal, span=span, seed=seed,
                       siblings=siblings)
    return out, variant


def _route(q, k, v, attn_mask, is_causal, span, block_k, scale):
    """How ``_attend`` runs a call: ``(route, seed, name)``, route ``"sdpa"`` (the span is every key
    and nothing masks it), ``"seeded"`` (flash's partial over the span, ``seed``, starts the Triton
    kernel) or ``"triton"`` (the kernel alone, visiting the span itself if there is one)."""
    if span[0] == span[1]:
        return "triton", None, "triton"
    if span == (0, cdiv(k.shape[2], block_k)) and attn_mask is None and not is_causal:
        return "sdpa", None, "sdpa"
    reason = "site or causal mask"
    if attn_mask is None and not is_causal:
        keys = _span_keys(span, block_k, k.shape[2])
        span_work = math.prod(q.shape) * (keys.stop - keys.start)
        if q.device.type in SHORT_SPAN_DEVICES and span_work < MIN_FLASH_SPAN_WORK:
            reason = (f"a span of {keys.stop - keys.start} keys, {span_work:.1e} multiply-adds, "
                      f"under {MIN_FLASH_SPAN_WORK:.1e}")
        else:
            seed, reason = flash_partial(q, k, v, span, block_k, scale)
            if seed is not None:
                return "seeded", seed, f"{reason} + triton"
    return "triton", None, f"triton (span in-kernel: {reason})"


def _unmasked(q, k, v, lists, block_q, block_k, scale, is_causal, span) -> list[KernelCall]:
    """The Triton launch this call would make without its key-padding mask, prepared (its flash
    partial run, if it takes one), not launched: a model whose padded capacity buckets mask keys makes
    that call once its context is full (which drops the mask, so that dense rows run flash)."""
    route, seed, _ = _route(q, k, v, None, is_causal, span, block_k, scale)
    if route == "sdpa":
        return []
    return [prepare_call(q, k, v, *lists, None, block_q, block_k, scale, is_causal, span=span, seed=seed)]


split_attention_op = torch.library.custom_op("li::split_attention", attend, mutates_args=())


@split_attention_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, attn_mask, block_q, block_k,
      scale, is_causal, span_first=0, span_end=0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


register_inference_only(split_attention_op, "li::split_attention")


def split_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    dense_span: tuple[int, int] = (0, 0),
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k, v (B, Hkv, Lk, D|Dv) restricted to ``layout`` plus the
    whole key blocks of ``dense_span`` (first, end), on top of an optional site / causal mask:
    ``to_dense_mask()`` of the layout, OR every key of the span, AND the site mask. Rows that see no
    key are zeros. Returns (B, H, Lq, Dv) in q's dtype."""
    if (layout.q_len, layout.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"layout is for (q_len, kv_len)={(layout.q_len, layout.kv_len)}, got q/k lengths {(q.shape[2], k.shape[2])}"
        )
    args = (
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks, layout.full_kv_indices,
        layout.key_keep, attn_mask, layout.block_q, layout.block_k, scale, is_causal, *dense_span,
    )
    needs_op = torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    return split_attention_op(*args) if needs_op else attend(*args)  # eager inference: skip the dispatch


def split_path(q, k, v, layout: BlockLayout, dense_span: tuple[int, int], attn_mask=None, is_causal=False) -> str:
    """Which path ``split_attention`` takes for this call: "sdpa" (the span is every key: plain SDPA),
    "<fused> + triton", "triton (span in-kernel: <why>)" (a mask, a call flash refuses, or on the GPU
    a span whose work is under ``MIN_FLASH_SPAN_WORK``) or "triton" (no span), where <fused> is the SDPA kernel that
    ran the span (cudnn, flash, efficient or cpu_flash). Runs the call once."""
    with torch.no_grad():
        return _attend(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
                       layout.full_kv_indices, layout.key_keep, attn_mask, layout.block_q, layout.block_k,
                       None, is_causal, dense_span)[1]


def warm_up(calls) -> list[str]:
    """Run every ``(q, k, v, layout, dense_span)`` call shape once, outside any timing or CUDA graph
    capture: the Triton kernel autotunes on its first call per ``AUTOTUNE_KEY`` (configs, warps,
    stages), and later calls reuse the winner (a new shape may still compile it once). Returns the
    path each call took (``split_path``).
    Call it at model warm-up with one call per attention site shape, never inside a chunk."""
    paths = [split_path(*call) for call in calls]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return paths

