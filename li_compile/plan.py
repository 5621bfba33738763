"""Plan slots: the fixed-capacity tensors that rewritten attention sites read their sparsity from.

The attention pass gives every distinct attention signature (batch, heads, query length, key length,
device, block sizes) one ``PlanSlot``, created once, and wires the slot's tensors into the compiled
graph as buffers. The context controller then changes what attention does by writing a new block
layout into those tensors **in place** (``slot.set_layout(layout)``) or by switching the slot back to
dense (``slot.clear()``). Nothing the compiled graph was specialised on changes: no shape, no Python
constant Dynamo guards on, no tensor address a CUDA graph captured. So a whole trajectory compiles once.

Each slot also keeps a host-side flag, ``is_dense``, that ``li::planned_attention`` reads to choose
between dense SDPA and the block-sparse kernel without a device sync, and a counter of the calls that
fell back to dense at run time, with the reason (``slot.fallbacks``).

Slot tensors (``B``, ``H``: the site's batch and heads; ``Q``/``K``: query/key blocks; capacity = K,
so every layout fits)::

    kv_num_blocks       (B, H, Q)    int32  partial key blocks visited per query block
    kv_indices          (B, H, Q, K) int32  their indices (first kv_num_blocks entries are used)
    full_kv_num_blocks  (B, H, Q)    int32  key blocks visited without element masks
    full_kv_indices     (B, H, Q, K) int32
    key_keep            (B, Lk)      bool   token-level key keep vector (applied on partial blocks)

Every accelerated model owns one ``Plan`` (``li_compile.Accelerator.plan``): two models never share
a slot. A graph names its slot by an integer id, process-unique and never reused; since Dynamo
shares one graph between instances of a module class, the op runs the slot *of the same signature*
in the plan of the model calling it (``li_compile.running``), made on its first call (dense), and
``find_slot`` only serves calls made outside any compiled graph (tests, direct calls). The id
tables (weak slots, immutable signatures) are the process-level structures here. The controller's
API::

    for slot in accelerator.plan.slots_for(q_len=seq.q_len, kv_len=seq.kv_len):
        slot.set_layout(layout)       # a li_compile.kernels.block_layout.BlockLayout
    accelerator.plan.clear()          # every slot dense again
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

INDEX_DTYPE = torch.int32
SLOT_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "key_keep")

# The op's way from a graph constant to its slot: ids are drawn once and never reused, slots are held
# weakly (their Plan, owned by one accelerated model, holds them).
_SLOT_IDS = itertools.count()
_SLOTS: "weakref.WeakValueDictionary[int, PlanSlot]" = weakref.WeakValueDictionary()
_SIGNATURES: "dict[int, SlotSignature]" = {}  # written once per id, never changed


def upload(value: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``value`` on ``device``, without the host waiting for the device: a host tensor bound for CUDA
    is staged in pinned memory and copied asynchronously on the current stream (the caching host
    allocator holds the staging buffer until the copy has run). Any other move is ``Tensor.to``."""
    device = torch.device(device)
    if value.device.type == "cpu" and device.type == "cuda":
        return value.contiguous().pin_memory().to(device, non_blocking=True)
    return value.to(device)


def find_slot(slot_id: int) -> "PlanSlot":
    """The live slot with process-unique id ``slot_id``; ``ValueError`` if its model is gone."""
    slot = _SLOTS.get(slot_id)
    if slot is None:
        raise ValueError(f"no live plan slot {slot_id}: the accelerated model that owned it was deleted")
    return slot


def slot_for_call(plan: "Plan | None", slot_id: int) -> "PlanSlot":
    """The slot a call of a graph slot ``slot_id`` runs: ``plan``'s slot of the same signature (the
    calling model's), or the slot ``slot_id`` itself when no model is running."""
    if plan is None:
        return find_slot(slot_id)
    return plan.slot_for(_SIGNATURES[slot_id])


@dataclass(frozen=True)
class SlotSignature:
    """What a slot's tensors are sized for: one attention shape on one device, cut into blocks."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    device: str
    block_q: int
    block_k: int

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "q_len", "kv_len", "block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SlotSignature.{name} must be a positive int, got {value!r}")

    @property
    def q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)


class PlanSlot:
    """The plan tensors one group of attention sites (same signature) reads, updated in place."""

    def __init__(self, signature: SlotSignature) -> None:
        self.id = next(_SLOT_IDS)
        _SLOTS[self.id] = self
        _SIGNATURES[self.id] = signature
        self.signature = signature
        s = signature
        blocks, heads_blocks = (s.batch, s.heads, s.q_blocks), (s.batch, s.heads, s.q_blocks, s.kv_blocks)
        self.kv_num_blocks = torch.zeros(blocks, dtype=INDEX_DTYPE, device=s.device)
        self.kv_indices = torch.zeros(heads_blocks, dtype=INDEX_DTYPE, device=s.device)
        self.full_kv_num_blocks = torch.zeros(blocks, dtype=INDEX_DTYPE, device=s.device)
        self.full_kv_indices = torch.zeros(heads_blocks, dtype=INDEX_DTYPE, device=s.device)
        self.key_keep = torch.ones((s.batch, s.kv_len), dtype=torch.bool, device=s.device)
        self._every_block = torch.arange(s.kv_blocks, dtype=INDEX_DTYPE, device=s.device)  # clear()'s indices
        self._tiling: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None  # (given, on device)
        self.fallbacks: collections.Counter[str] = collections.Counter()
        self.topk_constants: Any = None  # built by li::planned_attention on its first top-k call
        # the key index (token order) of query 0's own token, as the controller's layout says (a chunk's
        # queries sit after the prefix and the context, before any suffix); None: aligned to the keys' end
        self.own_offset: int | None = None
        self.dense_warmed: set[tuple] = set()  # mask forms whose dense route ran in a warm-up (``Plan.warming``)
        self.clear()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The slot's tensors in ``SLOT_TENSORS`` order (the order ``li::planned_attention`` takes them)."""
        return tuple(getattr(self, name) for name in SLOT_TENSORS)

    def clear(self) -> None:
        """Make the slot dense: sites run plain SDPA. The tensors are rewritten to list every key
        block too, so a graph captured on the sparse path (CUDA graphs) also computes dense."""
        self.is_dense = True
        self.dense_span: tuple[int, int] = (0, 0)
        self.tiling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.kv_num_blocks.fill_(self.signature.kv_blocks)
        self.kv_indices.copy_(self._every_block.expand_as(self.kv_indices))
        self.full_kv_num_blocks.zero_()
        self.full_kv_indices.zero_()
        self.key_keep.fill_(True)

    def set_layout(self, layout: Any, dense_span: tuple[int, int] = (0, 0),
                   tiling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Copy ``layout`` (a ``BlockLayout``) into the slot in place and make the slot sparse.

        The layout must have the slot's block sizes and lengths; its batch and head axes may be
        the slot's or 1 (shared, broadcast); its capacity at most the slot's (``kv_blocks``).
        ``dense_span``: key blocks ``(first, end)`` every query visits whole, run through flash
        (``kernels.split_attention``); ``tiling``: ``(query_perm, key_perm, query_inverse)`` when the
        layout is in 3D tile order (``li_compile.tiled_sequence``), else None (token order).
        Raises ``ValueError`` naming the first mismatch; the slot is unchanged then."""
        s = self.signature
        for name in ("block_q", "block_k", "q_len", "kv_len"):
            if getattr(layout, name) != getattr(s, name):
                raise ValueError(f"layout {name} is {getattr(layout, name)}, slot {self.id} needs {getattr(s, name)}")
        sources = {
            "kv_num_blocks": layout.kv_num_blocks,
            "kv_indices": layout.kv_indices,
            "full_kv_num_blocks": getattr(layout, "full_kv_num_blocks", None),
            "full_kv_indices": getattr(layout, "full_kv_indices", None),
            "key_keep": getattr(layout, "key_keep", None),
        }
        for name, value in sources.items():
            if value is not None:
                self._check_fits(name, value)
        with torch.no_grad():
            for name, value in sources.items():
                target = getattr(self, name)
                if value is None:
                    target.fill_(name == "key_keep")  # no full blocks; every key kept
                    continue
                value = upload(value, target.device)
                if name.endswith("indices"):
                    target.zero_()
                    target[..., : value.shape[-1]].copy_(value.expand(*target.shape[:-1], value.shape[-1]))
                else:
                    target.copy_(value.expand_as(target))
        self.is_dense = False
        self.dense_span = dense_span
        self.tiling = None if tiling is None else self._tiling_on_device(tuple(tiling))

    def _tiling_on_device(self, tiling: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``tiling`` on the slot's device, uploaded once while the same permutation tensors come
        back (a controller keeps one tile order per capacity)."""
        if self._tiling is None or any(a is not b for a, b in zip(self._tiling[0], tiling)):
            self._tiling = (tiling, tuple(upload(t, self.signature.device) for t in tiling))
        return self._tiling[1]

    def _check_fits(self, name: str, value: torch.Tensor) -> None:
        target = getattr(self, name)
        if value.dim() != target.dim():
            raise ValueError(f"layout {name} must have {target.dim()} dims {tuple(target.shape)}, got {tuple(value.shape)}")
        lead = value.shape[:-1] if name.endswith("indices") else value.shape
        want = target.shape[:-1] if name.endswith("indices") else target.shape
        for axis, (got, need) in enumerate(zip(lead, want)):
            if got not in (1, need):
                raise ValueError(f"layout {name} axis {axis} is {got}, slot {self.id} needs {need} or 1 (shared)")
        if name.endswith("indices") and value.shape[-1] > target.shape[-1]:
            raise ValueError(f"layout {name} capacity is {value.shape[-1]}, slot {self.id} holds at most {target.shape[-1]}")

    def misfit(self, q: torch.Tensor, k: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> str | None:
        """Why the slot cannot drive a call with these q (B, H, Lq, D) / k (B, Hkv, Lk, D) and slot
        tensors (capacity, dtype, device, token count), or None when it fits."""
        s = self.signature
        got = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if got != (s.batch, s.heads, s.q_len, s.kv_len):
            return f"call shape (B, H, Lq, Lk)={got} but slot {self.id} is {(s.batch, s.heads, s.q_len, s.kv_len)}"
        if torch.device(s.device) != q.device:
            return f"call on {q.device} but slot {self.id} is on {s.device}"
        for name, given, own in zip(SLOT_TENSORS, tensors, self.tensors()):
            if given.shape != own.shape or given.dtype != own.dtype or given.device != own.device:
                return (
                    f"slot tensor {name} is {tuple(given.shape)} {given.dtype} on {given.device}, "
                    f"slot {self.id} expects {tuple(own.shape)} {own.dtype} on {own.device}"
                )
        return None

    def record_fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1

    def __repr__(self) -> str:
        s = self.signature
        state = "dense" if self.is_dense else "sparse"
        return (
            f"PlanSlot(id={self.id}, {state}, B={s.batch}, H={s.heads}, Lq={s.q_len}, Lk={s.kv_len}, "
            f"blocks={s.block_q}x{s.block_k}, device={s.device}, fallbacks={sum(self.fallbacks.values())})"
        )


class Plan:
    """The plan slots of one accelerated model, by signature. Slots are never removed: compiled
    graphs hold their tensors."""

    def __init__(self) -> None:
        self._slots: list[PlanSlot] = []
        self._by_signature: dict[SlotSignature, PlanSlot] = {}
        self.warming = False  # inside ``warming_up``: sparse calls also run their dense route once per mask form
        self._prime: Callable[[PlanSlot], None] | None = None

    def slot_for(self, signature: SlotSignature) -> PlanSlot:
        """The slot for ``signature``, created (dense) on first use; inside ``warming_up`` a new slot
        is primed before anything reads it."""
        slot = self._by_signature.get(signature)
        if slot is None:
            slot = PlanSlot(signature)
            self._slots.append(slot)
            self._by_signature[signature] = slot
            if self._prime is not None:
                self._prime(slot)
        return slot

    @contextlib.contextmanager
    def warming_up(self, prime: Callable[[PlanSlot], None]) -> Iterator[None]:
        """A warm-up call's scope: ``prime(slot)`` runs on each slot created meanwhile (a site compiled
        by this call, before its graph first runs: e.g. writing the warm-up plan), and a sparse call
        also runs its dense route once per slot and mask form (``li::planned_attention``), so that
        one call of the model compiles the graph and both attention routes at their shapes."""
        self._prime, self.warming = prime, True
        try:
            yield
        finally:
            self._prime, self.warming = None, False

    def slots_for(
        self,
        *,
        batch: int | None = None,
        heads: int | None = None,
        q_len: int | None = None,
        kv_len: int | None = None,
        device: str | torch.device | None = None,
    ) -> list[PlanSlot]:
        """The slots whose signature matches every given field (e.g. a world's q_len and kv_len)."""
        want = {"batch": batch, "heads": heads, "q_len": q_len, "kv_len": kv_len}
        found = []
        for slot in self._slots:
            s = slot.signature
            if any(v is not None and getattr(s, k) != v for k, v in want.items()):
                continue
            if device is not None and torch.device(s.device) != torch.device(device):
                continue
            found.append(slot)
        return found

    def clear(self) -> None:
        """Every slot dense again."""
        for slot in self._slots:
            slot.clear()

    def __iter__(self) -> Iterator[PlanSlot]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

