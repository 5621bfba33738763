"""Run-time guards of the attention plan: does a plan fit the site it drives? If not, dense, and why.

Two moments are guarded:

- **writing** a plan (``write_plan``): the controller's layout must fit every slot it is written to
  (token counts, block sizes, capacity). A layout built for another model's sequence is a caller
  error, so it raises ``ValueError`` naming the mismatch, and no slot is changed (all are checked
  before any is written: a plan is never half-applied).
- **running** a site (``plan_fits``): ``li::planned_attention`` checks the slot against the actual
  call (capacity, dtype, device, token count) with ``PlanSlot.misfit``; a misfit runs dense and is
  counted on the slot with its reason. ``take_fallbacks`` collects those reasons (and resets the
  counts) so that the controller files them into the per-chunk statistics of the report.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

import torch

from li_compile.plan import PlanSlot


def plan_fits(slot: PlanSlot, q: torch.Tensor, k: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """True when ``slot`` can drive this call (``q: (B, H, Lq, D)``, ``k: (B, Hkv, Lk, D)``, the slot
    tensors the graph passed); otherwise records the reason on the slot and returns False (dense)."""
    reason = slot.misfit(q, k, tensors)
    if reason is not None:
        slot.record_fallback(reason)
    return reason is None


def layout_misfit(slot: PlanSlot, layout: Any) -> str | None:
    """Why ``layout`` (a ``BlockLayout``) cannot be written into ``slot``, or None when it fits."""
    s = slot.signature
    mine = (layout.q_len, layout.kv_len, layout.block_q, layout.block_k)
    theirs = (s.q_len, s.kv_len, s.block_q, s.block_k)
    if mine != theirs:
        return (
            f"plan for another model: layout (q_len, kv_len, block_q, block_k)={mine} but attention slot "
            f"{slot.id} is {theirs}"
        )
    if layout.capacity > s.kv_blocks:
        return f"layout capacity {layout.capacity} exceeds slot {slot.id}'s {s.kv_blocks} key blocks"
    device, host = torch.device(s.device), torch.device("cpu")
    if layout.kv_num_blocks.device not in (device, host):  # a host layout is uploaded (PlanSlot.set_layout)
        return f"layout is on {layout.kv_num_blocks.device} but slot {slot.id} is on {device} (or give it on the host)"
    return None


def write_plan(slots: Iterable[PlanSlot], layout: Any) -> list[PlanSlot]:
    """Write ``layout`` into every slot in place, or raise ``ValueError`` (slots untouched) naming the
    first slot it does not fit. Returns the slots written."""
    slots = list(slots)
    for slot in slots:
        reason = layout_misfit(slot, layout)
        if reason is not None:
            raise ValueError(reason)
    for slot in slots:
        slot.set_layout(layout)
    return slots


def take_fallbacks(slots: Iterable[PlanSlot]) -> dict[str, int]:
    """The run-time fallbacks (reason -> calls run dense) of ``slots`` since the last call; resets them."""
    total: collections.Counter[str] = collections.Counter()
    for slot in slots:
        total.update(slot.fallbacks)
        slot.fallbacks.clear()
    return dict(total)
