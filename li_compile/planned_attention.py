"""``torch.ops.li.planned_attention``: the op every rewritten attention site calls.

It computes attention on the normalised layout ``q: (B, H, Lq, D)``, ``k: (B, Hkv, Lk, D)``,
``v: (B, Hkv, Lk, Dv)`` (``Hkv`` divides ``H``: GQA), with an optional mask broadcastable to
``(B, H, Lq, Lk)`` (bool: True = attend; or additive, in q's dtype), and returns ``(B, H, Lq, Dv)``
in q's dtype, contiguous. Which path runs is decided by the plan slot of signature ``slot_id`` of
the model calling the graph (``li_compile.plan.slot_for_call``), read on the host, no device sync:

- dense slot: exactly the original site, ``F.scaled_dot_product_attention`` (except while a CUDA
  graph is captured: then always the kernel, whose cleared layout lists every block);
- sparse slot: the block-sparse kernel on the slot's layout, on top of the site's own mask;
- ``density`` < 1 (``sparsity.density``, a constant of the graph): any slot, dense or sparse, is
  refined per call to the best-scoring fraction of its blocks (mean-pooled q.k, plus each query
  block's own position: ``kernels.tiling.topk_layout``), computed on q's device with static shapes;
- a slot that does not fit the call (shape, dtype, device, token count) or a call the kernel
  refuses: dense, and the reason is counted in ``slot.fallbacks``;
- with ``context.reuse_rows``, inside a chunk: the calling model's ``ContextRowReuse`` runs the call
  (its first and last steps through the route above, the steps between reusing the context rows:
  ``li_compile.context_rows``).

It is a ``torch.library.custom_op`` with a fake implementation, which is what traces under
``torch.compile(fullgraph=True)`` both with the Triton interpreter on CPU and on the GPU (see
COMPILE-NOTES). Inference only: a call that needs a gradient raises.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from li_compile.kernels.block_layout import BlockLayout
from li_compile.kernels.block_sparse_attention import UnsupportedAttention, register_inference_only
from li_compile.kernels.split_attention import split_attention
from li_compile.kernels.tiling import own_key_blocks, topk_layout
from li_compile.plan import PlanSlot, slot_for_call
from li_compile.running import running
from li_compile.tiled_sequence import permute_mask


@torch.library.custom_op("li::planned_attention", mutates_args=())
def planned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor,
    full_kv_indices: torch.Tensor,
    key_keep: torch.Tensor,
    scale: float | None,
    is_causal: bool,
    slot_id: int,
    density: float = 1.0,
) -> torch.Tensor:
    """Attention driven by plan slot ``slot_id`` (shapes in the module docstring); ``density`` < 1:
    top-k selection within the slot's layout (``sparsity.density``)."""
    model = running()
    slot = slot_for_call(None if model is None else model.plan, slot_id)
    if model is not None and not is_causal:
        model.layers.call(q.shape[-2], k.shape[-2])
        if model.calibrating is not None:
            model.calibrating.record(model.layers.current(), slot, q, k, attn_mask, scale)  # the slot is dense meanwhile
    reuse = None if model is None or model.calibrating is not None or _capturing_cuda_graph(q) else model.context_rows
    planned = functools.partial(_planned, model, slot, q, k, v, attn_mask, kv_num_blocks, kv_indices,
                                full_kv_num_blocks, full_kv_indices, key_keep, scale, is_causal, density)
    if reuse is not None and reuse.applies(q, k, is_causal):
        return reuse.attend(q, k, v, attn_mask, scale, planned)
    if reuse is not None and model.plan.warming and not is_causal:
        reuse.warm(q, k, v, attn_mask, scale)
    return planned()


def _planned(model, slot: PlanSlot, q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
             key_keep, scale, is_causal, density) -> torch.Tensor:
    """The slot's route for every query row (module docstring)."""
    if not slot.is_dense or density < 1.0 or _capturing_cuda_graph(q):
        tensors = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep)
        reason = slot.misfit(q, k, tensors)
        if reason is None:
            out = _sparse(q, k, v, attn_mask, slot, density, scale, is_causal).contiguous()
            if model is not None and model.plan.warming:
                _warm_dense_route(q, k, v, attn_mask, slot, scale, is_causal)
            return out
        slot.record_fallback(reason)
    return dense_attention(q, k, v, attn_mask, scale, is_causal).contiguous()


def _warm_dense_route(q, k, v, attn_mask, slot: PlanSlot, scale, is_causal) -> None:
    """Warm-up only: run the dense route of a sparse call once per slot and mask form (its result is
    dropped), so that a later chunk whose plan runs dense at this shape builds nothing (SDPA's cuDNN
    backend builds a graph per shape and mask form on first use)."""
    form = (None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)), is_causal)
    if form not in slot.dense_warmed:
        slot.dense_warmed.add(form)
        dense_attention(q, k, v, attn_mask, scale, is_causal)


@planned_attention.register_fake
def _(q, k, v, attn_mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, key_keep, scale, is_causal,
      slot_id, density=1.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _layout(q: torch.Tensor, k: torch.Tensor, slot: PlanSlot, density: float) -> BlockLayout:
    """The layout the call runs: the slot's, or with ``density`` < 1 its top-k refinement (the
    slot's blocks, each query block keeping the best-scoring fraction and its own position's)."""
    if density >= 1.0:
        return slot_layout(slot)
    s = slot.signature
    own, dense = _topk_constants(slot)
    # a cleared slot lists every block as partial with every key kept: the same blocks as ``dense``,
    # all full (a CUDA graph capture must read the slot instead: its replays follow later plans)
    within = dense if slot.is_dense and not _capturing_cuda_graph(q) else slot_layout(slot)
    return topk_layout(q, k, density, block_q=s.block_q, block_k=s.block_k, always=own, within=within)


def _topk_constants(slot: PlanSlot) -> tuple[torch.Tensor | None, BlockLayout]:
    """What top-k selection needs per slot: the own-position blocks (None when queries outnumber
    keys), in the order the call sees the keys (the slot's tile order, if any), and the all-full
    dense layout; rebuilt only when the slot's own offset or tile order changes."""
    s, device = slot.signature, torch.device(slot.signature.device)
    tiling = None if slot.tiling is None else slot.tiling[0]
    cached = slot.topk_constants
    # the tile order is held, and compared by identity: an id() of a freed tensor can come back
    if cached is None or cached[0] != slot.own_offset or cached[1] is not tiling:
        offset = s.kv_len - s.q_len if slot.own_offset is None else slot.own_offset
        own = None
        if 0 <= offset <= s.kv_len - s.q_len:
            own_keys = torch.arange(offset, offset + s.q_len, device=device)
            if slot.tiling is not None:  # tiled query p is token query_perm[p]; its key sits at key_perm's inverse
                query_perm, key_perm, _ = slot.tiling
                own_keys = torch.argsort(key_perm)[offset + query_perm]
            own = own_key_blocks(own_keys, s.block_q, s.block_k, s.kv_len)
        dense = BlockLayout.dense(block_q=s.block_q, block_k=s.block_k, q_len=s.q_len, kv_len=s.kv_len, device=device)
        slot.topk_constants = (slot.own_offset, tiling, own, dense)
    return slot.topk_constants[2:]


def _capturing_cuda_graph(q: torch.Tensor) -> bool:
    """A CUDA graph replays the path taken at capture: take the sparse path there, always, so that
    later in-place layout updates reach the replays (a cleared slot lists every block: dense)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


register_inference_only(planned_attention, "li::planned_attention")


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> torch.Tensor:
    """What the original site computed: SDPA, with GQA when k/v have fewer heads than q."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def _sparse(q, k, v, attn_mask, slot: PlanSlot, density: float, scale, is_causal) -> torch.Tensor:
    """The slot's layout (or its top-k refinement) on top of the site's own mask (and causal mask,
    top-left aligned as SDPA's): the slot's dense span through flash and the rest through the
    block-sparse kernel, in the slot's tile order if it has one; masked SDPA (counted in
    ``slot.fallbacks``) where the kernel refuses."""
    if slot.tiling is not None:
        if is_causal:  # a causal mask is defined in token order: no tile order for it
            slot.record_fallback("causal site with a tile-order plan: ran dense")
            return dense_attention(q, k, v, attn_mask, scale, is_causal)
        query_perm, key_perm, _ = slot.tiling
        q, k, v = q.index_select(2, query_perm), k.index_select(2, key_perm), v.index_select(2, key_perm)
        attn_mask = permute_mask(attn_mask, query_perm, key_perm)
    layout = _layout(q, k, slot, density)
    try:
        out = split_attention(q, k, v, layout, slot.dense_span, scale, attn_mask, is_causal)
    except UnsupportedAttention as refusal:
        slot.record_fallback(f"kernel refused: {refusal}")
        out = _masked_dense(q, k, v, attn_mask, layout, slot.dense_span, scale, is_causal)
    except RuntimeError as failure:  # a kernel that fails to build or launch here costs speed, never the answer
        slot.record_fallback(f"kernel failed ({type(failure).__name__}: {str(failure)[:200]}): ran masked dense")
        out = _masked_dense(q, k, v, attn_mask, layout, slot.dense_span, scale, is_causal)
    return out if slot.tiling is None else out.index_select(2, slot.tiling[2])


def _masked_dense(q, k, v, attn_mask, layout: BlockLayout, dense_span: tuple[int, int], scale, is_causal
                  ) -> torch.Tensor:
    """What the kernel computes, as masked SDPA: ``layout``'s visible pairs, every key of the dense
    span (key blocks ``(first, end)``), and the site's masks."""
    mask = _with_causal(attn_mask, q.shape[2], k.shape[2], q.device) if is_causal else attn_mask
    keep = layout.to_dense_mask().clone()
    keep[..., dense_span[0] * layout.block_k:dense_span[1] * layout.block_k] = True
    if mask is None:
        mask = keep
    elif mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask.masked_fill(~keep, float("-inf"))
    return dense_attention(q, k, v, mask, scale, False)


def _with_causal(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
    if mask is None:
        return causal
    return mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))


def slot_layout(slot: PlanSlot) -> BlockLayout:
    """The slot's tensors as a ``BlockLayout`` (its ``to_dense_mask()`` is what the kernel computes)."""
    s = slot.signature
    return BlockLayout(*slot.tensors(), block_q=s.block_q, block_k=s.block_k, q_len=s.q_len, kv_len=s.kv_len)
