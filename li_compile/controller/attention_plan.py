"""From a chunk's context decision to the block layout its attention sites run, written in place.

The generation loop feeds the kept context frames right-aligned in ``capacity`` slots, padding
first (``li_compile.worlds.pipeline.gather_context``), and masks the padding itself. The plan makes
that padding (and, for KV-cache models that keep dropped frames in their cache, the dropped frames)
stop costing attention: key blocks holding only dropped tokens are never visited, blocks holding
only kept tokens are visited with no element mask, mixed blocks apply the token-level ``key_keep``
(``kernels.tiling.frame_layout`` over the model's raster token order, ``key_frame_ids``).
Full-sequence models (``queries="all"``) also skip query blocks made only of dropped tokens: their
rows are never read by a kept token (the keys are masked), so they are left as zeros.

``write_chunk_plan`` writes the layout into every plan slot of the sequence's (q_len, kv_len), or
clears them (dense) when nothing is dropped; slots that do not exist yet (the model has not been
compiled at that capacity) are reported, and the call runs dense with its own key-padding mask.

``write_tile_chunk_plan`` is the finer plan (``sparsity.plan="tiles"``, the default when the lens is
known): the sequence in 3D tile order and, per query tile, only the key tiles the cameras say it
needs (``controller.tile_plan``); padding and dropped slots are never visited either. With
``sparsity.flash_span``, a tile plan names the chunk's own keys as the slot's dense span, which runs
through flash when the call has no mask of its own (``kernels.split_attention``).
"""

from __future__ import annotations

import torch

from typing import Sequence

from li_compile.controller.tile_plan import TilePlanParams, write_tile_plan
from li_compile.kernels.block_layout import BlockLayout, cdiv
from li_compile.kernels.tiling import frame_layout
from li_compile.passes.guards import write_plan
from li_compile.options import SparsityOptions
from li_compile.plan import Plan, PlanSlot
from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence


def padded_context_keep(kept: int, capacity: int) -> torch.Tensor:
    """Which of ``capacity`` context slots hold a frame when ``kept`` frames are right-aligned: ``(capacity,)``."""
    if not 0 <= kept <= capacity:
        raise ValueError(f"kept frames must be in [0, capacity={capacity}], got {kept}")
    return torch.arange(capacity) >= capacity - kept


def visited_share(sequence: SequenceLayout, kept: int) -> float:
    """The share of (query, key) token pairs a plan visits when ``kept`` of the context slots hold
    frames: kept keys over keys, times kept queries over queries (``queries="all"``; chunk queries
    are all kept). The block-level ``density`` of the written plan is this or a little more (blocks
    that mix kept and dropped tokens are visited whole)."""
    dropped = (sequence.context_frames - kept) * sequence.tokens_per_frame
    keys = 1 - dropped / sequence.kv_len
    return keys * keys if sequence.queries == "all" else keys


def key_frame_ids(sequence: SequenceLayout) -> torch.Tensor:
    """Frame of every key token ``(kv_len,)`` long: context slots ``0..C-1``, chunk frames ``C..``,
    -1 for the always-visible prefix and suffix tokens (``kernels.tiling.frame_layout``'s convention)."""
    frames = torch.arange(sequence.frames).repeat_interleave(sequence.tokens_per_frame)
    prefix = torch.full((sequence.prefix_tokens,), -1)
    suffix = torch.full((sequence.suffix_tokens,), -1)
    return torch.cat([prefix, frames, suffix])


def _frame_keep(sequence: SequenceLayout, context_keep: torch.Tensor) -> torch.Tensor:
    if context_keep.shape != (sequence.context_frames,) or context_keep.dtype != torch.bool:
        raise ValueError(
            f"context_keep must be bool ({sequence.context_frames},) (one per context slot), "
            f"got {context_keep.dtype} {tuple(context_keep.shape)}"
        )
    return torch.cat([context_keep.cpu(), torch.ones(sequence.chunk_frames, dtype=torch.bool)])


def token_keep(sequence: SequenceLayout, context_keep: torch.Tensor) -> torch.Tensor:
    """Key keep vector ``(kv_len,)`` bool: prefix, suffix and chunk tokens always, context tokens of
    the kept slots (``context_keep: (context_frames,)`` bool)."""
    ids = key_frame_ids(sequence)
    return torch.where(ids < 0, True, _frame_keep(sequence, context_keep)[ids.clamp_min(0)])


def frame_drop_layout(
    sequence: SequenceLayout, context_keep: torch.Tensor, block_q: int, block_k: int,
) -> BlockLayout:
    """The layout that never visits dropped context tokens (rules in the module docstring), shared
    by batch and heads: ``kv_num_blocks (1, 1, Q)`` etc., ``key_keep (1, kv_len)``."""
    layout = frame_layout(
        _frame_keep(sequence, context_keep), key_frame_ids(sequence), sequence.q_len, block_q=block_q, block_k=block_k
    )
    if sequence.queries == "all":  # queries are the keys: skip query blocks of dropped tokens only
        active = _pad_to_blocks(token_keep(sequence, context_keep), block_q).any(-1)[:, None]
        layout = BlockLayout.from_block_mask(
            layout.block_mask() & active, block_q=block_q, block_k=block_k, q_len=sequence.q_len,
            kv_len=sequence.kv_len, full=layout.block_mask(full_only=True) & active, key_keep=layout.key_keep,
        )
    return layout


def _pad_to_blocks(keep: torch.Tensor, block: int) -> torch.Tensor:
    """``(L,)`` -> ``(ceil(L / block), block)``, the ragged tail padded with False."""
    blocks = cdiv(keep.shape[0], block)
    return torch.cat([keep, keep.new_zeros(blocks * block - keep.shape[0])]).reshape(blocks, block)


def write_chunk_plan(plan: Plan, sequence: SequenceLayout, context_keep: torch.Tensor) -> dict[str, object]:
    """Write the chunk's layout into the slots of ``plan`` (one model's) matching ``sequence`` (or clear them when every context
    slot is kept); each slot gets the layout cut in its own blocks, on its device. Returns stats:
    ``plan`` ("sparse", "dense" or "no site"), ``density`` (of visited block pairs), ``slots`` (ids)."""
    slots = plan.slots_for(q_len=sequence.q_len, kv_len=sequence.kv_len)
    if not slots:
        return {"plan": "no site", "density": 1.0, "slots": []}
    mark_own_offset(slots, sequence)
    if bool(context_keep.all()):
        for slot in slots:
            slot.clear()
        return {"plan": "dense", "density": 1.0, "slots": [s.id for s in slots]}
    layouts: dict[tuple, BlockLayout] = {}  # on the host: set_layout copies to the device without a sync
    for slot in slots:
        s = slot.signature
        key = (s.block_q, s.block_k)
        if key not in layouts:
            layouts[key] = frame_drop_layout(sequence, context_keep, *key)
        write_plan([slot], layouts[key])
    density = next(iter(layouts.values())).density
    return {"plan": "sparse", "density": round(density, 4), "slots": [s.id for s in slots]}


def chunk_key_span(sequence: SequenceLayout, block_k: int) -> tuple[int, int]:
    """Key blocks ``(first, end)`` of ``block_k`` keys wholly inside the chunk's own tokens at their
    *token-order* positions (after the prefix and the context frames); ``(0, 0)`` when no whole block
    fits. In tile order with ``sinks="in_place"`` those blocks hold the same tokens. With
    ``sinks="end"`` (``TiledSequence``'s default, the controller's) the prefix sits behind the video,
    so the chunk starts ``prefix_tokens`` keys earlier and the span is shifted by ``prefix_tokens``:
    it leaves out the chunk's first keys (their blocks run in the kernel, not in flash) and covers up
    to ``prefix_tokens`` sink keys after the chunk. Either way, where ``span_seen_by_every_row`` holds,
    every query row visits the whole span: it visits the chunk, and every row visits the sinks."""
    start = sequence.prefix_tokens + sequence.context_frames * sequence.tokens_per_frame
    stop = start + sequence.chunk_frames * sequence.tokens_per_frame
    first, end = cdiv(start, block_k), stop // block_k
    return (first, end) if first < end else (0, 0)


def tile_shape(block: int) -> tuple[int, int, int]:
    """The 3D tile of one attention block of ``block`` tokens: one frame, 8 rows (4 below 64 tokens)."""
    rows = 8 if block >= 64 else 4
    return (1, rows, max(1, block // rows))


def span_seen_by_every_row(sequence: SequenceLayout, params: Sequence[TilePlanParams | None]) -> bool:
    """Whether every query row's tile plan visits the chunk's own keys, the span SDPA runs for all
    rows (``kernels.split_attention``): chunk queries (KV-cache form), or every token a query with
    dense or camera context rows. Frame-local context rows do not: the span would attend them to the chunk
    too (on HY's full preset 0.14 of all token pairs, on top of a plan of density 0.2)."""
    return sequence.queries == "chunk" or all(p is None or p.context_queries in ("dense", "camera") for p in params)


def write_tile_chunk_plan(
    plan: Plan, tiled: TiledSequence, roles: Sequence[str], context_poses: torch.Tensor,
    chunk_poses: torch.Tensor, bounds: torch.Tensor, params: TilePlanParams, sparsity: SparsityOptions,
    head_params: Sequence[TilePlanParams | None] | None = None,
) -> dict[str, object]:
    """Write the chunk's tile plan (``controller.tile_plan``) into every slot of ``plan`` matching
    ``tiled.sequence`` (in the tile order of ``tiled``, made once per capacity: its permutations are
    not rebuilt per chunk), in each slot's blocks; a plan denser than ``sparsity.max_density``
    clears its slot instead (dense). ``roles``: "pad"/"memory"/"recent" per context slot;
    ``context_poses (capacity, 4, 4)`` (any matrix on padding), ``chunk_poses (F, 4, 4)``, ``bounds
    (4,)`` the lens; ``head_params``: a calibrated plan per head (``Calibration.head_params``) in place
    of ``params``, for slots of that many heads (ValueError for another, ``check_calibrated_heads``).
    Returns stats as ``write_chunk_plan`` (plus ``dropped`` candidates)."""
    sequence = tiled.sequence
    slots = plan.slots_for(q_len=sequence.q_len, kv_len=sequence.kv_len)
    if not slots:
        return {"plan": "no site", "density": 1.0, "slots": []}
    mark_own_offset(slots, sequence)
    if head_params is not None:
        check_calibrated_heads(len(head_params), slots)
    ours = (params,) if head_params is None else tuple(head_params)
    densities = []
    for slot in slots:
        s = slot.signature
        layout = slot_buffer(slot)
        span = flash_span(sequence, ours, sparsity, s.block_k)
        stats = write_tile_plan(layout, tiled, roles, context_poses, chunk_poses, bounds, ours, span)
        kernel = kernel_density(stats.density, span, cdiv(s.kv_len, s.block_k))
        densities.append((stats.density, kernel))
        if kernel > sparsity.max_density:  # the kernel would lose to flash: dense, the site's mask exact
            slot.clear()
            continue
        slot.set_layout(layout, dense_span=span,
                        tiling=(tiled.query_perm, tiled.key_perm, tiled.query_inverse))
    planned = round(sum(d for d, _ in densities) / len(densities), 4)
    dense = sum(k for _, k in densities) / len(densities) > sparsity.max_density
    return {"plan": "dense" if dense else "sparse", "plan_kind": "tiles", "density": 1.0 if dense else planned,
            "plan_density": planned, "slots": [s.id for s in slots], "dropped": stats.dropped}


def mark_own_offset(slots: Sequence[PlanSlot], sequence: SequenceLayout) -> None:
    """Tell ``slots`` where their queries' own tokens sit among the keys of ``sequence``: query 0 is
    key 0 when every token is a query, else the chunk's first token (after the prefix and the
    context; a suffix follows the chunk). Top-k selection keeps each query block's own blocks."""
    offset = 0 if sequence.queries == "all" else sequence.frame_start(sequence.context_frames)
    for slot in slots:
        slot.own_offset = offset


def check_calibrated_heads(heads: int, slots: Sequence[PlanSlot]) -> None:
    """Raise ValueError when a calibration with ``heads`` plans per layer meets a slot of another head
    count: it was made for another model, and its plans would not act."""
    for slot in slots:
        s = slot.signature
        if s.heads != heads:
            raise ValueError(
                f"the calibration has plans for {heads} heads, but the attention sites of {s.q_len} x {s.kv_len} "
                f"tokens have {s.heads} heads: it was made for another model; calibrate this one"
            )


def flash_span(sequence: SequenceLayout, params: Sequence[TilePlanParams | None], sparsity: SparsityOptions,
               block_k: int) -> tuple[int, int]:
    """The key blocks ``(first, end)`` of ``block_k`` tokens that SDPA runs for every query row of a
    tile plan with ``params`` (the chunk's own keys, ``chunk_key_span``), or ``(0, 0)``: ``sparsity.flash_span`` off, or some
    row's plan does not visit them all (``span_seen_by_every_row``)."""
    if sparsity.flash_span and span_seen_by_every_row(sequence, params):
        return chunk_key_span(sequence, block_k)
    return (0, 0)


def kernel_density(density: float, span: tuple[int, int], key_blocks: int) -> float:
    """The share of the block pairs outside the flash ``span`` (key blocks ``[first, end)``, visited by
    every query block and run by SDPA) that a plan of ``density`` visits: what the block-sparse kernel
    runs, against what dense attention over the same pairs would (``density`` when there is no span)."""
    share = (span[1] - span[0]) / key_blocks
    return density if share >= 1 else max(0.0, (density - share) / (1 - share))


def slot_buffer(slot: PlanSlot) -> BlockLayout:
    """A ``BlockLayout`` over fresh host tensors shaped like ``slot``'s (a plan is built in it, then
    copied into the slot in place, asynchronously: the slot's own tensors change only in
    ``set_layout``)."""
    s = slot.signature
    tensors = [torch.zeros(t.shape, dtype=t.dtype) for t in slot.tensors()]
    return BlockLayout(*tensors, block_q=s.block_q, block_k=s.block_k, q_len=s.q_len, kv_len=s.kv_len)
