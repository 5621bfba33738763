"""``BlockLayout``: a block-sparse attention pattern in BCSR form, the kernel's input.

The query axis is cut into blocks of ``block_q`` tokens and the key axis into blocks of ``block_k``
tokens (the last block of each may be ragged). For every (batch, head, query block) the layout lists
the key blocks to visit, in two lists:

- *partial* blocks (``kv_num_blocks``, ``kv_indices``): visited with the token-level key mask
  ``key_keep`` applied (a dropped frame that does not align to blocks, say);
- *full* blocks (``full_kv_num_blocks``, ``full_kv_indices``, optional): visited with no element
  mask at all, the kernel's fast path.

Shapes (``B|1``, ``H|1``: per batch/head, or shared and broadcast; ``Q``/``K``: query/key blocks;
``C``: capacity, the most key blocks one query block may list, so a layout can be rewritten in
place without changing shapes)::

    kv_num_blocks        (B|1, H|1, Q)     int32
    kv_indices           (B|1, H|1, Q, C)  int32   first kv_num_blocks entries used
    full_kv_num_blocks   (B|1, H|1, Q)     int32   or None
    full_kv_indices      (B|1, H|1, Q, C)  int32   or None
    key_keep             (B|1, kv_len)     bool    or None (every key kept)

Any strides: a tensor whose last dim is not contiguous is copied for the kernel (a layout written
in place every chunk should be contiguous, as every layout this package builds is).

Index values are checked (``validate_layout``) when a layout is built on the CPU; on a GPU that would
sync, so plans written in place there call ``validate_layout`` when they are written (the kernel
never reads out of bounds either way: it clamps counts and skips bad indices).

Build one with ``BlockLayout.from_block_mask`` or ``BlockLayout.dense``; look at one with
``to_dense_mask()``, ``density`` and ``picture()``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

INDEX_DTYPE = torch.int32


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of ``b`` cover ``a``."""
    return -(-a // b)


def whole_number(value: object) -> int | None:
    """``value`` as an int where it is one (an int, a numpy or 0-d torch integer), else None (a bool,
    a bool tensor, a float, a float tensor)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_sizes(**sizes: object) -> None:
    """Raise ``ValueError`` naming the first of ``sizes`` (name=value: block sizes, lengths) that is
    not a positive int (a bool or a float such as ``16.0`` is not)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class BlockLayout:
    """Which key blocks every query block visits (BCSR); see the module docstring for shapes."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None
    key_keep: torch.Tensor | None
    block_q: int
    block_k: int
    q_len: int
    kv_len: int

    def __post_init__(self) -> None:
        check_sizes(**{f"BlockLayout.{name}": getattr(self, name) for name in ("block_q", "block_k", "q_len", "kv_len")})
        if (self.full_kv_num_blocks is None) != (self.full_kv_indices is None):
            raise ValueError("BlockLayout.full_kv_num_blocks and full_kv_indices must both be given or both be None")
        for counts, indices in self._lists():
            self._check_list(counts, indices)
        if self.kv_num_blocks.device.type == "cpu":  # values too, where reading them costs no device sync
            # (not uniqueness: it would double a full-size plan's host time, and the library's builders
            # list each block once; a launch on the CPU checks it, ``check_layout``)
            validate_layout(self, unique=False)
        if self.key_keep is not None:
            keep = self.key_keep
            if keep.dtype != torch.bool or keep.dim() != 2 or keep.shape[1] != self.kv_len:
                raise ValueError(
                    f"BlockLayout.key_keep must be a bool (B|1, kv_len={self.kv_len}) tensor, "
                    f"got {keep.dtype} {tuple(keep.shape)}"
                )

    def _check_list(self, counts: torch.Tensor, indices: torch.Tensor) -> None:
        q_blocks = self.q_blocks
        if counts.dtype != INDEX_DTYPE or indices.dtype != INDEX_DTYPE:
            raise ValueError(f"BlockLayout block counts and indices must be int32, got {counts.dtype} and {indices.dtype}")
        if counts.dim() != 3 or counts.shape[2] != q_blocks:
            raise ValueError(f"BlockLayout kv_num_blocks must be (B|1, H|1, Q={q_blocks}), got {tuple(counts.shape)}")
        if indices.dim() != 4 or indices.shape[:3] != counts.shape:
            raise ValueError(
                f"BlockLayout kv_indices must be (B|1, H|1, Q, C) matching kv_num_blocks {tuple(counts.shape)}, "
                f"got {tuple(indices.shape)}"
            )

    def _lists(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lists = [(self.kv_num_blocks, self.kv_indices)]
        if self.full_kv_num_blocks is not None:
            lists.append((self.full_kv_num_blocks, self.full_kv_indices))
        return lists

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_block_mask(
        cls,
        blocks: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        q_len: int,
        kv_len: int,
        full: torch.Tensor | None = None,
        key_keep: torch.Tensor | None = None,
    ) -> "BlockLayout":
        """A layout from a block-level bool mask ``blocks`` ((B|1, H|1, Q, K) or (Q, K); True = visit).

        ``full`` (same shape, optional) marks the visited blocks that need no element mask: they go to
        the full lists, the rest (``blocks & ~full``) to the partial lists; ``full`` marking a block
        that ``blocks`` does not visit is a ValueError (checked on the CPU: on a GPU reading it would
        sync, and ``topk_layout`` builds layouts inside attention ops). Capacity is ``K``."""
        check_sizes(block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
        q_blocks, kv_blocks = cdiv(q_len, block_q), cdiv(kv_len, block_k)
        blocks = _as_4d(blocks, "blocks", q_blocks, kv_blocks)
        if full is None:
            partial, full_lists = blocks, None
        else:
            full = _as_4d(full, "full", q_blocks, kv_blocks)
            stray = full & ~blocks
            if stray.device.type == "cpu" and bool(stray.any()):
                where = tuple(int(i) for i in stray.nonzero()[0])
                raise ValueError(
                    f"full marks block {where} (B, H, query block, key block) that blocks does not visit: "
                    "expected full to mark visited blocks only"
                )
            partial, full_lists = blocks & ~full, _to_bcsr(full)
        counts, indices = _to_bcsr(partial)
        return cls(
            counts,
            indices,
            *(full_lists if full_lists is not None else (None, None)),
            key_keep,
            block_q,
            block_k,
            q_len,
            kv_len,
        )

    @classmethod
    def dense(
        cls, *, block_q: int, block_k: int, q_len: int, kv_len: int, device: str | torch.device = "cpu"
    ) -> "BlockLayout":
        """Every key block for every query block, all full (shared across batch and heads)."""
        check_sizes(block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len)
        blocks = torch.ones(cdiv(q_len, block_q), cdiv(kv_len, block_k), dtype=torch.bool, device=device)
        return cls.from_block_mask(
            blocks, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, full=blocks
        )

    # -- views ----------------------------------------------------------------------------------

    @property
    def q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_q)

    @property
    def kv_blocks(self) -> int:
        return cdiv(self.kv_len, self.block_k)

    @property
    def capacity(self) -> int:
        return self.kv_indices.shape[-1]

    def block_mask(self, full_only: bool = False, partial_only: bool = False) -> torch.Tensor:
        """The visited blocks as bool (B|1, H|1, Q, K); ``full_only``/``partial_only`` pick one list."""
        lists = self._lists()
        if full_only:
            lists = lists[1:]
        elif partial_only:
            lists = lists[:1]
        lead = torch.broadcast_shapes(*(c.shape for c, _ in self._lists()))
        out = torch.zeros(*lead, self.kv_blocks + 1, dtype=torch.bool, device=self.kv_num_blocks.device)
        for counts, indices in lists:
            used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
            target = torch.where(used, indices.long(), self.kv_blocks).expand(*lead, indices.shape[-1])
            out.scatter_(-1, target, True)
        return out[..., :-1]

    def to_dense_mask(self) -> torch.Tensor:
        """The token-level bool mask (B|1, H|1, q_len, kv_len) this layout computes: True where a query
        sees a key (partial blocks under ``key_keep``, full blocks whole)."""
        def tokens(blocks: torch.Tensor) -> torch.Tensor:
            t = blocks.repeat_interleave(self.block_q, dim=2).repeat_interleave(self.block_k, dim=3)
            return t[:, :, : self.q_len, : self.kv_len]

        partial = tokens(self.block_mask(partial_only=True))
        if self.key_keep is not None:
            partial = partial & self.key_keep[:, None, None, :]
        if self.full_kv_num_blocks is None:
            return partial
        return partial | tokens(self.block_mask(full_only=True))

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, averaged over batch and heads."""
        return self.block_mask().float().mean().item()

    def picture(self, batch: int = 0, head: int = 0) -> str:
        """An ASCII picture of one (batch, head)'s blocks: '#' full, '+' partial, '.' skipped."""
        full = self.block_mask(full_only=True) if self.full_kv_num_blocks is not None else None
        partial = self.block_mask(partial_only=True)
        b, h = min(batch, partial.shape[0] - 1), min(head, partial.shape[1] - 1)
        rows = []
        for i in range(self.q_blocks):
            row = ""
            for j in range(self.kv_blocks):
                if full is not None and full[min(b, full.shape[0] - 1), min(h, full.shape[1] - 1), i, j]:
                    row += "#"
                else:
                    row += "+" if partial[b, h, i, j] else "."
            rows.append(row)
        return "\n".join(rows)

    def to(self, device: str | torch.device) -> "BlockLayout":
        """The same layout with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockLayout(
            move(self.kv_num_blocks), move(self.kv_indices), move(self.full_kv_num_blocks),
            move(self.full_kv_indices), move(self.key_keep), self.block_q, self.block_k, self.q_len, self.kv_len,
        )

    def __repr__(self) -> str:
        b, h = self.kv_num_blocks.shape[:2]
        full = "none" if self.full_kv_num_blocks is None else "listed"
        keep = "all" if self.key_keep is None else f"{int(self.key_keep.sum())}/{self.key_keep.numel()}"
        return (
            f"BlockLayout(B={b}, H={h}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"blocks={self.block_q}x{self.block_k}, grid={self.q_blocks}x{self.kv_blocks}, capacity={self.capacity}, "
            f"density={self.density:.3f}, full={full}, key_keep={keep})"
        )


def validate_layout(layout: BlockLayout, dense_span: tuple[int, int] | None = None, unique: bool = True) -> None:
    """Raise ``ValueError`` naming the first bad index value of ``layout``: a count outside
    [0, capacity], a used ``kv_indices`` entry outside [0, kv_blocks), or (``unique``) a key block
    listed twice for one query block (``validate_unique``). With ``dense_span`` (first, end) key
    blocks, also a listed block inside the span (the split path reduces the span by flash: the kernel
    would skip it, wasting its work). Syncs once when the layout is on a GPU: call it when plans are
    written, not per attention call."""
    names = [("kv_num_blocks", "kv_indices")]
    if layout.full_kv_num_blocks is not None:
        names.append(("full_kv_num_blocks", "full_kv_indices"))
    for (count_name, index_name), (counts, indices) in zip(names, layout._lists()):
        validate_indices(counts, indices, layout.kv_blocks, count_name, index_name, dense_span)
    if unique:
        validate_unique(layout._lists(), layout.kv_blocks)


def validate_unique(lists: list[tuple[torch.Tensor, torch.Tensor]], kv_blocks: int) -> None:
    """Raise ``ValueError`` when a query block lists a key block twice, in one list or in both the
    partial and the full one (the kernel would count its keys twice). ``lists``: (counts (..., Q),
    indices (..., Q, C)) pairs whose used indices are already known to be in [0, kv_blocks)."""
    seen = None
    for counts, indices in lists:
        used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None].long()
        target = torch.where(used, indices.long(), kv_blocks)  # unused entries land in a spare column
        listed = torch.zeros(*indices.shape[:-1], kv_blocks + 1, dtype=torch.int32, device=indices.device)
        listed = listed.scatter_add(-1, target, torch.ones_like(target, dtype=torch.int32))[..., :kv_blocks]
        seen = listed if seen is None else seen.expand(torch.broadcast_shapes(seen.shape, listed.shape)) + listed
    if seen is not None and seen.numel() and int(seen.max()) > 1:
        where = [int(x) for x in (seen > 1).nonzero()[0]]
        raise ValueError(f"query block {tuple(where[:-1])} lists key block {where[-1]} more than once (in one list, "
                         "or in both kv_indices and full_kv_indices): expected each key block at most once")


def validate_indices(
    counts: torch.Tensor,
    indices: torch.Tensor,
    kv_blocks: int,
    count_name: str = "kv_num_blocks",
    index_name: str = "kv_indices",
    dense_span: tuple[int, int] | None = None,
) -> None:
    """The value check behind ``validate_layout`` for one (counts (..., Q), indices (..., Q, C)) list."""
    capacity = indices.shape[-1]
    low, high = (int(x) for x in torch.stack([counts.min(), counts.max()]).tolist()) if counts.numel() else (0, 0)
    if low < 0 or high > capacity:
        bad = low if low < 0 else high
        raise ValueError(f"{count_name} holds {bad}, expected counts in [0, capacity={capacity}]")
    used = torch.arange(capacity, device=indices.device) < counts[..., None]
    listed = indices[used.expand_as(indices)]
    if listed.numel() == 0:
        return
    low, high = (int(x) for x in torch.stack([listed.min(), listed.max()]).tolist())
    if low < 0 or high >= kv_blocks:
        bad = low if low < 0 else high
        raise ValueError(f"{index_name} lists key block {bad}, expected indices in [0, kv_blocks={kv_blocks})")
    if dense_span is not None and dense_span[0] < dense_span[1]:
        inside = listed[(listed >= dense_span[0]) & (listed < dense_span[1])]
        if inside.numel():
            raise ValueError(
                f"{index_name} lists key block {int(inside[0])}, inside the dense span {tuple(dense_span)}: "
                "expected the span's blocks left out of the layout (split_layout)"
            )


def _as_4d(mask: torch.Tensor, name: str, q_blocks: int, kv_blocks: int) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool block mask, got {mask.dtype}")
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4 or tuple(mask.shape[2:]) != (q_blocks, kv_blocks):
        raise ValueError(
            f"{name} must be (B|1, H|1, Q={q_blocks}, K={kv_blocks}) or (Q, K), got {tuple(mask.shape)}"
        )
    return mask


def _to_bcsr(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (..., Q) and indices (..., Q, K) of a bool block mask; visited indices first, ascending."""
    return to_bcsr(blocks, blocks.shape[-1])


def to_bcsr(blocks: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``(..., Q)`` and indices ``(..., Q, capacity)`` int32 of a bool block mask ``(..., Q, K)``:
    visited indices first, ascending, then unvisited ones (never read: only the first ``count``
    entries are). ``capacity <= K``; a row visiting more than ``capacity`` blocks would be cut, so
    callers check that first. No host sync."""
    if not 1 <= capacity <= blocks.shape[-1]:
        raise ValueError(f"capacity must be in [1, {blocks.shape[-1]}] (key blocks), got {capacity}")
    counts = blocks.sum(-1, dtype=INDEX_DTYPE)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)[..., :capacity]
    return counts, order.to(INDEX_DTYPE)
