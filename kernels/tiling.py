"""3D tiling of video tokens and the block layouts the controller builds on it.

A latent video of ``frames x grid_h x grid_w`` tokens is stored in raster order (frame, row, column).
Attention blocks of 128 consecutive raster tokens are thin horizontal strips: neighbours in space and
time land in different blocks, so locality-based sparsity wastes most of every visited block.
``TileOrder`` permutes the tokens so that each run of ``tile_t * tile_h * tile_w`` consecutive tokens
is one 3D tile (e.g. 1x8x16 or 2x8x8 = 128 tokens): then one attention block is one compact 3D tile.
Prefix/suffix tokens (text, actions, registers) keep their places at both ends.

Grids that the tile does not divide get ragged edge tiles (smaller), ordered like the others; then
a block may span parts of two tiles, and the builders stay correct by visiting a block whenever any
of its tokens qualifies. Layouts are over blocks of ``block_q``/``block_k`` tokens of the order used.

Layout builders (queries = the current chunk's tokens, keys = memory + recent + current tokens is
the main case; queries = all tokens works the same way):

- ``frame_layout``: keep or drop whole key frames (dropped frames are never visited);
- ``local_window_layout``: each query tile sees key tiles within a (dt, dh, dw) tile neighbourhood;
- ``topk_layout``: per query block, the key blocks with the highest pooled q.k similarity, within a
  density budget (of every block, or of the blocks another layout visits), plus ``own_blocks``;
- ``union``: visit a block when any of the given layouts visits it (conservative: partial blocks
  read the union of the key_keep vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from li_compile.kernels.block_layout import BlockLayout, cdiv, check_sizes


@dataclass(frozen=True)
class TileOrder:
    """The 3D-tile token order of ``frames x grid_h x grid_w`` video tokens between ``prefix`` and
    ``suffix`` always-visible tokens. ``perm[i]`` is the raster index of the i-th token in tile order."""

    frames: int
    grid_h: int
    grid_w: int
    tile: tuple[int, int, int] = (1, 8, 16)
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self) -> None:
        for name in ("frames", "grid_h", "grid_w"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TileOrder.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("prefix", "suffix"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TileOrder.{name} must be a non-negative int, got {getattr(self, name)!r}")
        if len(self.tile) != 3 or any(not isinstance(t, int) or t < 1 for t in self.tile):
            raise ValueError(f"TileOrder.tile must be three positive ints (t, h, w), got {self.tile!r}")

    @property
    def video_tokens(self) -> int:
        return self.frames * self.grid_h * self.grid_w

    @property
    def length(self) -> int:
        return self.prefix + self.video_tokens + self.suffix

    @property
    def tiles(self) -> tuple[int, int, int]:
        """Number of tiles along (t, h, w), edge tiles included."""
        return tuple(cdiv(n, t) for n, t in zip((self.frames, self.grid_h, self.grid_w), self.tile))

    @cached_property
    def tile_of_video_token(self) -> torch.Tensor:
        """(video_tokens,) long: the tile index (t, h, w tile-raster) of every raster video token."""
        f, h, w = torch.meshgrid(
            torch.arange(self.frames), torch.arange(self.grid_h), torch.arange(self.grid_w), indexing="ij"
        )
        _, nh, nw = self.tiles
        tt, th, tw = self.tile
        return ((f // tt) * nh * nw + (h // th) * nw + (w // tw)).reshape(-1)

    @cached_property
    def tile_boxes(self) -> torch.Tensor:
        """(tiles, 3, 2) long: for every tile index, the ``[start, stop)`` ranges of its frames, rows
        and columns (edge tiles are smaller)."""
        size = torch.tensor(self.tile)
        start = _tile_grid(self, 0) * size
        stop = torch.minimum(start + size, torch.tensor([self.frames, self.grid_h, self.grid_w]))
        return torch.stack([start, stop], -1)

    @cached_property
    def perm(self) -> torch.Tensor:
        """(length,) long: raster index of each tile-order position (gather with it to permute)."""
        video = torch.argsort(self.tile_of_video_token, stable=True) + self.prefix
        return torch.cat([torch.arange(self.prefix), video, torch.arange(self.prefix + self.video_tokens, self.length)])

    @cached_property
    def inverse(self) -> torch.Tensor:
        """(length,) long: tile-order position of each raster token (gather with it to undo)."""
        return torch.argsort(self.perm)

    def permute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Raster -> tile order along ``dim`` (default: the token axis of (..., L, D))."""
        self._check_length(x, dim)
        return x.index_select(dim, self.perm.to(x.device))

    def unpermute(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Tile order -> raster along ``dim``: ``unpermute(permute(x)) == x``."""
        self._check_length(x, dim)
        return x.index_select(dim, self.inverse.to(x.device))

    def _check_length(self, x: torch.Tensor, dim: int) -> None:
        if x.shape[dim] != self.length:
            raise ValueError(f"token axis {dim} has {x.shape[dim]} tokens, TileOrder expects {self.length}")

    @cached_property
    def tile_ids(self) -> torch.Tensor:
        """(length,) long: for each tile-order position, its tile index; -1 for prefix/suffix tokens."""
        ids = torch.full((self.length,), -1, dtype=torch.long)
        ids[self.prefix : self.prefix + self.video_tokens] = self.tile_of_video_token.sort(stable=True).values
        return ids

    @cached_property
    def frame_ids(self) -> torch.Tensor:
        """(length,) long: for each tile-order position, its frame; -1 for prefix/suffix tokens."""
        frames = torch.arange(self.frames).repeat_interleave(self.grid_h * self.grid_w)
        ids = torch.full((self.length,), -1, dtype=torch.long)
        ids[self.prefix : self.prefix + self.video_tokens] = frames[self.perm[self.prefix : self.prefix + self.video_tokens] - self.prefix]
        return ids


def frame_layout(
    keep_frames: torch.Tensor,
    key_frame_ids: torch.Tensor,
    q_len: int,
    *,
    block_q: int = 128,
    block_k: int = 128,
) -> BlockLayout:
    """Every query sees exactly the keys of kept frames (and the always-visible tokens, frame id -1).

    ``keep_frames``: (F,) bool over key frames; ``key_frame_ids``: (Lk,) frame of each key token in
    the key order used (e.g. ``TileOrder.frame_ids`` or raster frame ids), -1 = always visible.
    Blocks wholly inside kept frames are full; blocks that mix kept and dropped tokens are partial
    with ``key_keep``; blocks of dropped frames only are never visited. Shared by batch and heads."""
    check_sizes(block_q=block_q, block_k=block_k, q_len=q_len)
    if keep_frames.dtype != torch.bool or keep_frames.dim() != 1:
        raise ValueError(f"keep_frames must be a (F,) bool tensor, got {keep_frames.dtype} {tuple(keep_frames.shape)}")
    if key_frame_ids.dim() != 1 or int(key_frame_ids.max()) >= keep_frames.numel():
        raise ValueError(
            f"key_frame_ids must be (Lk,) frame ids below {keep_frames.numel()} (or -1), got shape "
            f"{tuple(key_frame_ids.shape)} with max {int(key_frame_ids.max())}"
        )
    keep = torch.where(key_frame_ids < 0, True, keep_frames[key_frame_ids.clamp_min(0)])
    kv_len = keep.numel()
    kv_blocks = cdiv(kv_len, block_k)
    padded = torch.cat([keep, keep.new_zeros(kv_blocks * block_k - kv_len)]).view(kv_blocks, block_k)
    real = (torch.arange(kv_blocks * block_k) < kv_len).view(kv_blocks, block_k)
    any_kept = padded.any(-1)
    all_kept = (padded | ~real).all(-1) & any_kept  # the ragged last block counts only its real keys
    q_blocks = cdiv(q_len, block_q)
    return BlockLayout.from_block_mask(
        any_kept.expand(q_blocks, -1).contiguous(), block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len,
        full=all_kept.expand(q_blocks, -1).contiguous(), key_keep=keep[None].clone(),
    )


def local_window_layout(
    query: TileOrder,
    key: TileOrder,
    window: tuple[int, int, int],
    *,
    query_frame_offset: int = 0,
    block_q: int = 128,
    block_k: int = 128,
) -> BlockLayout:
    """Each query tile sees the key tiles within ``window = (dt, dh, dw)`` tiles of it (|delta| <= d
    on every axis), and every prefix/suffix token; prefix/suffix queries see every key.

    ``query``/``key`` are the tile orders of the two sides (same grid and tile); the query frames
    are key frames ``query_frame_offset, ...`` (e.g. the chunk at the end of memory + recent +
    chunk), a multiple of the tile's frames in ``[0, key.frames - query.frames]``. Blocks are visited
    whole (full) when any of their token pairs is in the window: exact when every block is whole
    tiles, a superset otherwise."""
    check_sizes(block_q=block_q, block_k=block_k)
    if (query.grid_h, query.grid_w, query.tile) != (key.grid_h, key.grid_w, key.tile):
        raise ValueError(
            f"query and key tile orders need the same grid and tile, got {(query.grid_h, query.grid_w, query.tile)} "
            f"and {(key.grid_h, key.grid_w, key.tile)}"
        )
    if len(window) != 3 or any(not isinstance(d, int) or d < 0 for d in window):
        raise ValueError(f"window must be three non-negative ints (dt, dh, dw), got {window!r}")
    last = key.frames - query.frames
    if isinstance(query_frame_offset, bool) or not isinstance(query_frame_offset, int) or not 0 <= query_frame_offset <= last:
        raise ValueError(
            f"query_frame_offset must be an int in [0, {last}] (key frames {key.frames} - query frames "
            f"{query.frames}) so that the query frames are key frames, got {query_frame_offset!r}"
        )
    if query_frame_offset % query.tile[0]:
        raise ValueError(f"query_frame_offset {query_frame_offset} must be a multiple of the tile's frames {query.tile[0]}")
    # tile-level neighbourhood, one extra group (index -1) for prefix/suffix tokens that sees / is seen by all
    q_coords = _tile_grid(query, query_frame_offset // query.tile[0])
    k_coords = _tile_grid(key, 0)
    near = torch.ones(q_coords.shape[0] + 1, k_coords.shape[0] + 1)
    near[:-1, :-1] = ((q_coords[:, None, :] - k_coords[None, :, :]).abs() <= torch.tensor(window)).all(-1).float()
    blocks = (_block_incidence(query, block_q) @ near @ _block_incidence(key, block_k).T) > 0
    return BlockLayout.from_block_mask(
        blocks, block_q=block_q, block_k=block_k, q_len=query.length, kv_len=key.length, full=blocks
    )


def _tile_grid(order: TileOrder, t_offset: int) -> torch.Tensor:
    """(tiles, 3) long: (t, h, w) tile coordinates of every tile index, t shifted by ``t_offset``."""
    nt, nh, nw = order.tiles
    t, h, w = torch.meshgrid(torch.arange(nt) + t_offset, torch.arange(nh), torch.arange(nw), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def _block_incidence(order: TileOrder, block: int) -> torch.Tensor:
    """(blocks, tiles + 1) float: 1 where a block of the tile order holds a token of that tile (the
    last column: prefix/suffix tokens)."""
    n_tiles = math.prod(order.tiles)
    groups = torch.where(order.tile_ids < 0, n_tiles, order.tile_ids)
    incidence = torch.zeros(cdiv(order.length, block), n_tiles + 1)
    incidence[torch.arange(order.length) // block, groups] = 1.0
    return incidence


def topk_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    density: float,
    *,
    block_q: int = 128,
    block_k: int = 128,
    always: torch.Tensor | None = None,
    within: BlockLayout | None = None,
) -> BlockLayout:
    """Per (batch, head, query block), the ``ceil(density * n)`` of its ``n`` candidate key blocks
    with the highest similarity of mean-pooled queries and keys, plus the candidates in ``always``
    ((Q, K) or broadcastable bool, e.g. ``own_blocks`` or a frame layout's blocks).

    Candidates: every key block (``n = K``), or the blocks ``within`` visits (e.g. a frame-drop plan:
    dropped frames stay dropped), whose full/partial split and ``key_keep`` the result keeps; without
    ``within`` every chosen block is full (top-k is a block-level approximation). q: (B, H, Lq, D),
    k: (B, Hkv, Lk, D). Static shapes (capacity K), no host sync: it can run inside an attention op.
    The result is per batch and head (B, H, Q, K)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    check_sizes(block_q=block_q, block_k=block_k)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"key heads ({Hkv}) must divide query heads ({H})")
    pooled_q = _pool_blocks(q, block_q)
    pooled_k = _pool_blocks(k, block_k).repeat_interleave(H // Hkv, dim=1)
    scores = pooled_q @ pooled_k.transpose(-1, -2)  # (B, H, Q, K); the scale does not change the order
    if within is None:
        candidates, full = torch.ones_like(scores, dtype=torch.bool), None
    else:
        full = within.block_mask(full_only=True) if within.full_kv_num_blocks is not None else None
        candidates = within.block_mask().expand_as(scores)
    chosen = _top_fraction(scores, candidates, density)
    if always is not None:
        chosen |= always.to(chosen.device) & candidates
    return BlockLayout.from_block_mask(
        chosen, block_q=block_q, block_k=block_k, q_len=Lq, kv_len=Lk,
        full=chosen if within is None else (chosen & full if full is not None else None),
        key_keep=None if within is None else within.key_keep,
    )


def _top_fraction(scores: torch.Tensor, candidates: torch.Tensor, density: float) -> torch.Tensor:
    """The ``ceil(density * n)`` highest-scoring candidates of each row (``n`` candidates in the row,
    at least one kept where any exists), as a bool mask; static shapes (a rank per entry)."""
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    quota = torch.ceil(density * candidates.sum(-1, keepdim=True)).clamp_min(1)
    return candidates & (rank < quota)


def own_blocks(q_len: int, kv_len: int, block_q: int, block_k: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(Q, K) bool: the key blocks holding each query block's own positions, queries aligned to the
    end of the keys (self-attention: the diagonal; a chunk after its cached context: the chunk's own
    keys). Kept by top-k selection so that no token loses its neighbourhood."""
    if q_len > kv_len:
        raise ValueError(f"queries ({q_len}) cannot be aligned to the end of fewer keys ({kv_len})")
    return own_key_blocks(torch.arange(kv_len - q_len, kv_len, device=device), block_q, block_k, kv_len)


def own_key_blocks(own_keys: torch.Tensor, block_q: int, block_k: int, kv_len: int) -> torch.Tensor:
    """(Q, K) bool: the key blocks holding ``own_keys (Lq,)``, each query's own token among the keys
    (in whatever order the call sees them: token or tile order), per query block."""
    q_len = own_keys.shape[0]
    own = torch.zeros(cdiv(q_len, block_q), cdiv(kv_len, block_k), dtype=torch.bool, device=own_keys.device)
    own[torch.arange(q_len, device=own_keys.device) // block_q, own_keys // block_k] = True
    return own


def _pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D): the mean of each block's tokens (ragged last block too)."""
    B, H, L, D = x.shape
    n = cdiv(L, block)
    padded = torch.zeros(B, H, n * block, D, dtype=torch.float32, device=x.device)
    padded[:, :, :L] = x.float()
    counts = torch.full((n,), block, dtype=torch.float32, device=x.device)
    counts[-1] = L - (n - 1) * block
    return padded.view(B, H, n, block, D).sum(3) / counts[:, None]


def union(*layouts: BlockLayout) -> BlockLayout:
    """A layout visiting every block that any of ``layouts`` visits (same block sizes and lengths).

    A block is full when some layout has it full; otherwise partial, with ``key_keep`` the union of
    the layouts' keep vectors (a layout without one keeps every key)."""
    if not layouts:
        raise ValueError("union needs at least one layout")
    first = layouts[0]
    for other in layouts[1:]:
        got = (other.block_q, other.block_k, other.q_len, other.kv_len)
        want = (first.block_q, first.block_k, first.q_len, first.kv_len)
        if got != want:
            raise ValueError(f"union of layouts with different (block_q, block_k, q_len, kv_len): {want} and {got}")
    blocks = _broadcast_or([layout.block_mask() for layout in layouts])
    full = _broadcast_or([
        layout.block_mask(full_only=True) if layout.full_kv_num_blocks is not None else torch.zeros_like(layout.block_mask())
        for layout in layouts
    ])
    partial_keeps = [layout.key_keep for layout in layouts if layout.block_mask(partial_only=True).any()]
    keep = None
    if partial_keeps and all(k is not None for k in partial_keeps):
        keep = _broadcast_or(partial_keeps)
    return BlockLayout.from_block_mask(
        blocks, block_q=first.block_q, block_k=first.block_k, q_len=first.q_len, kv_len=first.kv_len,
        full=full, key_keep=keep,
    )


def _broadcast_or(masks: list[torch.Tensor]) -> torch.Tensor:
    shape = torch.broadcast_shapes(*(m.shape for m in masks))
    out = torch.zeros(shape, dtype=torch.bool, device=masks[0].device)
    for m in masks:
        out |= m
    return out
