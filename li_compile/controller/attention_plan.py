"""From a chunk's context decision to the block layout its attention sites run, written in place.

The generation loop feeds the kept context frames right-aligned in ``capacity`` slots, padding
first (``li_compile.worlds.pipeline.gather_context``), and masks the padding itself. The plan makes
that padding (and, for KV-cache models that keep dropped frames in their cache, the dropped frames)
stop costing attention: key blocks holding only dropped tokens are never visited, blocks holding
only kept tokens are visited with no element mask, mixed blocks apply the token-level ``key_keep``.
Full-sequence models (``queries="all"``) also skip query blocks made only of dropped tokens: their
rows are never read by a kept token (the keys are masked), so they are left as zeros.

``write_chunk_plan`` writes the layout into every plan slot of the sequence's (q_len, kv_len), or
clears them (dense) when nothing is dropped; slots that do not exist yet (the model has not been
compiled at that capacity) are reported, and the call runs dense with its own key-padding mask.
"""

from __future__ import annotations

import torch

from li_compile.kernels.block_layout import BlockLayout, cdiv
from li_compile.passes.guards import write_plan
from li_compile.plan import PLAN, Plan
from li_compile.sequence import SequenceLayout


def padded_context_keep(kept: int, capacity: int) -> torch.Tensor:
    """Which of ``capacity`` context slots hold a frame when ``kept`` frames are right-aligned: ``(capacity,)``."""
    if not 0 <= kept <= capacity:
        raise ValueError(f"kept frames must be in [0, capacity={capacity}], got {kept}")
    return torch.arange(capacity) >= capacity - kept


def token_keep(sequence: SequenceLayout, context_keep: torch.Tensor) -> torch.Tensor:
    """Key keep vector ``(kv_len,)`` bool: prefix, suffix and chunk tokens always, context tokens of
    the kept slots (``context_keep: (context_frames,)`` bool)."""
    if context_keep.shape != (sequence.context_frames,) or context_keep.dtype != torch.bool:
        raise ValueError(
            f"context_keep must be bool ({sequence.context_frames},) (one per context slot), "
            f"got {context_keep.dtype} {tuple(context_keep.shape)}"
        )
    frames = torch.cat([context_keep.cpu(), torch.ones(sequence.chunk_frames, dtype=torch.bool)])
    tokens = frames.repeat_interleave(sequence.tokens_per_frame)
    prefix = torch.ones(sequence.prefix_tokens, dtype=torch.bool)
    suffix = torch.ones(sequence.suffix_tokens, dtype=torch.bool)
    return torch.cat([prefix, tokens, suffix])


def frame_drop_layout(
    sequence: SequenceLayout, context_keep: torch.Tensor, block_q: int, block_k: int,
    device: str | torch.device = "cpu",
) -> BlockLayout:
    """The layout that never visits dropped context tokens (rules in the module docstring), shared
    by batch and heads: ``kv_num_blocks (1, 1, Q)`` etc., ``key_keep (1, kv_len)``."""
    keep = token_keep(sequence, context_keep)
    keys = _pad_to_blocks(keep, block_k)  # (K, block_k)
    visit_keys, full_keys = keys.any(-1), keys.all(-1)
    if sequence.queries == "all":
        active_queries = _pad_to_blocks(keep, block_q).any(-1)
    else:
        active_queries = torch.ones(cdiv(sequence.q_len, block_q), dtype=torch.bool)
    blocks = active_queries[:, None] & visit_keys[None, :]
    full = active_queries[:, None] & full_keys[None, :]
    layout = BlockLayout.from_block_mask(
        blocks, block_q=block_q, block_k=block_k, q_len=sequence.q_len, kv_len=sequence.kv_len,
        full=full, key_keep=keep[None],
    )
    return layout.to(device)


def _pad_to_blocks(keep: torch.Tensor, block: int) -> torch.Tensor:
    """``(L,)`` -> ``(ceil(L / block), block)``; the ragged tail is padded with the last block's own
    values (so an all-kept ragged block stays full)."""
    blocks = cdiv(keep.shape[0], block)
    padded = torch.cat([keep, keep[-1:].expand(blocks * block - keep.shape[0])])
    return padded.reshape(blocks, block)


def write_chunk_plan(sequence: SequenceLayout, context_keep: torch.Tensor, plan: Plan = PLAN) -> dict[str, object]:
    """Write the chunk's layout into the plan slots of ``sequence`` (or clear them when every context
    slot is kept); each slot gets the layout cut in its own blocks, on its device. Returns stats:
    ``plan`` ("sparse", "dense" or "no site"), ``density`` (of visited block pairs), ``slots`` (ids)."""
    slots = plan.slots_for(q_len=sequence.q_len, kv_len=sequence.kv_len)
    if not slots:
        return {"plan": "no site", "density": 1.0, "slots": []}
    if bool(context_keep.all()):
        for slot in slots:
            slot.clear()
        return {"plan": "dense", "density": 1.0, "slots": [s.id for s in slots]}
    layouts: dict[tuple, BlockLayout] = {}
    for slot in slots:
        s = slot.signature
        key = (s.block_q, s.block_k, s.device)
        if key not in layouts:
            layouts[key] = frame_drop_layout(sequence, context_keep, *key)
        write_plan([slot], layouts[key])
    density = next(iter(layouts.values())).density
    return {"plan": "sparse", "density": round(density, 4), "slots": [s.id for s in slots]}
