"""A ``SequenceLayout`` in 3D tile order: the permutations a rewritten attention site applies.

``kernels.tiling.TileOrder`` orders one run of ``frames x grid_h x grid_w`` video tokens between
prefix and suffix tokens. A world model's attention call has two sides, and the sequence form
decides how they relate (``li_compile.sequence``):

- ``queries="all"`` (HY-WorldPlay full sequence): queries and keys are the same tokens, so both
  use ``key_order``: ``[prefix] [context + chunk frames, tile by tile] [suffix]``.
- ``queries="chunk"`` (KV cache, Matrix-Game-3.0): queries are the chunk's video tokens only
  (``query_order``, no prefix/suffix); keys are prefix, context, chunk and suffix (``key_order``).

Where the prefix and suffix tokens go (``sinks``): ``"end"`` (default) moves them behind the video
tiles in tile order, so video tile ``i`` starts at token ``i * tile_tokens`` and blocks of
``tile_tokens`` are whole tiles whatever the prefix length (a 16-token prefix in front would make
every 128-token block straddle two tiles); ``"in_place"`` keeps them where the model has them (then
blocks align only when the prefix is a multiple of the block). Either way they are always visible
and the permutation is undone on the output.

The context frames must be whole tiles in time (``context_frames % tile_t == 0``): then no tile mixes
context and chunk frames, and the key permutation is the context's own permutation followed by the
chunk's (``key_perm == cat(context part, chunk part, prefix, suffix)`` with ``sinks="end"``). So a KV cache can be stored
in tile order once per chunk (the cache pass permutes the context K/V once), and each denoising
step permutes only the chunk's q, k, v with ``query_perm`` and puts the output back with
``query_inverse``.

Cost (the approach): every permutation is one gather, ``index_select`` along the token axis, one
read and one write of the tensor: ``O(L * D)`` per head against attention's ``O(L^2 * D)``. Per
attention call that is four gathers (q, k, v in; the output back); ``benchmarks/tile_permute.py``
measures them next to the attention call they serve (CPU, fp32, 4 heads x 64, 4 + 2 frames of 16x16,
32 prefix tokens: the full-sequence gathers cost 0.20x the SDPA call at 1568 tokens, the KV-cache
form's 0.03x; the share falls as 1 / L, and is still to be measured on the H200). Cheaper still where the model allows it: permute
once at the producer (the token sequence after patchify, with the position tables - RoPE, camera
rays - permuted alike) and undo it once before unpatchify; then every layer runs in tile order for
the price of two gathers per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from li_compile.kernels.tiling import TileOrder
from li_compile.sequence import SequenceLayout

DEFAULT_TILE = (2, 8, 8)  # frames x rows x columns: 128 tokens, one attention block of 128 per tile
SINK_POSITIONS = ("end", "in_place")  # where prefix/suffix tokens sit in tile order


@dataclass(frozen=True)
class TiledSequence:
    """``sequence`` with its video tokens in ``tile`` order (t, h, w); see the module docstring."""

    sequence: SequenceLayout
    tile: tuple[int, int, int] = DEFAULT_TILE
    sinks: str = "end"

    def __post_init__(self) -> None:
        if self.sinks not in SINK_POSITIONS:
            raise ValueError(f"sinks must be one of {SINK_POSITIONS}, got {self.sinks!r}")
        if len(self.tile) != 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tile):
            raise ValueError(f"tile must be three positive ints (t, h, w), got {self.tile!r}")
        if self.sequence.context_frames % self.tile[0]:
            raise ValueError(
                f"context_frames ({self.sequence.context_frames}) must be a multiple of the tile's frames "
                f"({self.tile[0]}) so that no tile mixes context and chunk frames"
            )

    @cached_property
    def key_order(self) -> TileOrder:
        """The tile order of the keys: every frame, prefix and suffix in place."""
        s = self.sequence
        return TileOrder(s.frames, s.grid_h, s.grid_w, self.tile, s.prefix_tokens, s.suffix_tokens)

    @cached_property
    def query_order(self) -> TileOrder:
        """The tile order of the queries: ``key_order`` (``queries="all"``) or the chunk's frames alone."""
        s = self.sequence
        if s.queries == "all":
            return self.key_order
        return TileOrder(s.chunk_frames, s.grid_h, s.grid_w, self.tile)

    @property
    def context_tiles(self) -> int:
        """How many key tiles hold context frames (they come first, after the prefix)."""
        _, nh, nw = self.key_order.tiles
        return self.sequence.context_frames // self.tile[0] * nh * nw

    @property
    def query_tile_offset(self) -> int:
        """Key tile index of query tile 0: 0 for ``queries="all"``, ``context_tiles`` for ``"chunk"``."""
        return 0 if self.sequence.queries == "all" else self.context_tiles

    def _sinks_last(self, order: TileOrder) -> torch.Tensor:
        """(length,) long: positions of ``order`` with the video tiles first, then prefix, then suffix."""
        video = torch.arange(order.prefix, order.prefix + order.video_tokens)
        if self.sinks == "in_place":
            return torch.arange(order.length)
        return torch.cat([video, torch.arange(order.prefix), torch.arange(order.prefix + order.video_tokens, order.length)])

    @cached_property
    def query_perm(self) -> torch.Tensor:
        """(q_len,) long: gather queries (and, in chunk form, the chunk's own k and v) with it."""
        return self.query_order.perm[self._sinks_last(self.query_order)]

    @cached_property
    def query_inverse(self) -> torch.Tensor:
        """(q_len,) long: gather the attention output with it to get back the model's order."""
        return torch.argsort(self.query_perm)

    @cached_property
    def key_perm(self) -> torch.Tensor:
        """(kv_len,) long: gather keys and values with it."""
        return self.key_order.perm[self._sinks_last(self.key_order)]

    @cached_property
    def key_inverse(self) -> torch.Tensor:
        """(kv_len,) long: undo ``key_perm``."""
        return torch.argsort(self.key_perm)

    @cached_property
    def query_tile_ids(self) -> torch.Tensor:
        """(q_len,) long: the query tile (``query_order`` numbering) of each query in tile order; -1 = sink."""
        return self.query_order.tile_ids[self._sinks_last(self.query_order)]

    @cached_property
    def key_tile_ids(self) -> torch.Tensor:
        """(kv_len,) long: the key tile (``key_order`` numbering) of each key in tile order; -1 = sink."""
        return self.key_order.tile_ids[self._sinks_last(self.key_order)]

    @cached_property
    def key_frame_ids(self) -> torch.Tensor:
        """(kv_len,) long: the frame (context then chunk) of each key in tile order; -1 = sink."""
        return self.key_order.frame_ids[self._sinks_last(self.key_order)]

    def permute_queries(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Model order -> tile order along the token axis ``dim`` of queries: ``(..., q_len, D)``."""
        return _gather(x, dim, self.query_perm)

    def unpermute_outputs(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Tile order -> model order of an attention output ``(..., q_len, D)``."""
        return _gather(x, dim, self.query_inverse)

    def permute_keys(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Model order -> tile order of keys or values ``(..., kv_len, D)``."""
        return _gather(x, dim, self.key_perm)

    def unpermute_keys(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Tile order -> model order of keys or values ``(..., kv_len, D)``."""
        return _gather(x, dim, self.key_inverse)


def permute_mask(mask: torch.Tensor | None, query_perm: torch.Tensor, key_perm: torch.Tensor) -> torch.Tensor | None:
    """A site mask ``(..., Lq | 1, Lk | 1)`` with its query rows gathered by ``query_perm`` and its
    keys by ``key_perm`` (a tile order, or any row selection); broadcast axes stay as they are."""
    if mask is None:
        return None
    if mask.shape[-1] > 1:
        mask = mask.index_select(-1, key_perm)
    if mask.dim() >= 2 and mask.shape[-2] > 1:
        mask = mask.index_select(-2, query_perm)
    return mask


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x`` reordered along ``dim`` by ``index`` (one ``index_select``: the permutation's whole cost)."""
    if x.shape[dim] != index.numel():
        raise ValueError(f"token axis {dim} has {x.shape[dim]} tokens, the tile order expects {index.numel()}")
    return x.index_select(dim, index.to(x.device))
