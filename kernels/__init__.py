"""Triton kernels and the torch ops that wrap them: ``BlockLayout`` (a block-sparse layout) and
``sparse_attention`` (the fused block-sparse kernel; ``split_attention.split_attention`` adds a flash span)."""

from li_compile.kernels.block_layout import BlockLayout
from li_compile.kernels.block_sparse_attention import sparse_attention

__all__ = ["BlockLayout", "sparse_attention"]
