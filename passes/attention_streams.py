"""Self- or cross-attention? Which token streams queries and keys are projected from.

Walking up from a tensor through everything but projections (``F.linear``, ``addmm``, a matmul with
a 2-D weight that is a graph input or attribute), the inputs of the first projection met on each
path are the hidden states q, k and v were projected from. Norms, RoPE, reshapes, casts, ``torch.cat``
with a KV cache and chunking a fused QKV projection are all walked through. Each hidden state is
then resolved to its *token streams*: walking up through ``torch.cat`` (keys projected from
``cat([context, x])`` carry the tokens of both) and row-wise ops (norms, casts, elementwise
arithmetic, following the operands of the result's full shape: a broadcast scale or shift is no
stream; a cast's dtype reference is none either) to the tensors it is made of. Self-attention:
the keys' streams hold all of the queries' (keys of ``cat([context, x]) + positions`` hold the
queries' ``x + positions``). Cross-attention otherwise: queries of ``x + camera_tokens`` and keys of
``other + camera_tokens`` (a shared embedding does not make them one), queries that mix in the keys'
stream (``x + other`` over ``other``), keys from other tokens only (text, actions). Queries of a
per-token modulated ``norm(x)`` over keys of ``x`` are called cross-attention too (left dense: safe). Keys of the current chunk concatenated with cached keys or with the
context, and joint text+video tokens, are self-attention. If either side has no projection above
it (q, k, v given as graph inputs), the site is not called cross-attention.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from li_compile.passes.attention_spellings import example

_LINEAR = (torch._C._nn.linear, F.linear)
_CAT = (torch.cat, torch.concat, torch.concatenate)
_ROW_WISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.rsqrt, F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm, F.silu, F.gelu,
})
_CASTS = frozenset({"to", "type", "type_as"})  # a tensor argument is a dtype/device reference, not data
_ROW_WISE_METHODS = frozenset({"add", "sub", "mul", "div", "float", "half", "bfloat16", "double", "contiguous", *_CASTS})


class TokenStreams:
    """Token sources of nodes in one graph, memoised across the sites of the graph."""

    def __init__(self) -> None:
        self._sources: dict[fx.Node, frozenset[fx.Node]] = {}
        self._streams: dict[fx.Node, frozenset[fx.Node]] = {}

    def sources(self, node: fx.Node) -> frozenset[fx.Node]:
        """The token streams of the hidden states ``node`` was projected from (empty if it was not
        projected)."""
        return _memoised(self._sources, node, _walked_inputs, self._compute)

    def _compute(self, node: fx.Node) -> frozenset[fx.Node]:
        projected = _projection_input(node)
        if projected is not None:
            return _memoised(self._streams, projected, _stream_inputs, self._stream)
        found: set[fx.Node] = set()
        for parent in _walked_inputs(node):
            found |= self._sources[parent]
        return frozenset(found)

    def _stream(self, node: fx.Node) -> frozenset[fx.Node]:
        parents = _stream_inputs(node)
        return frozenset().union(*(self._streams[p] for p in parents)) if parents else frozenset({node})

    def is_cross_attention(self, q: fx.Node, k: fx.Node) -> bool:
        """True when q and k both come from projections and the queries have a token stream the keys lack."""
        q_sources, k_sources = self.sources(q), self.sources(k)
        return bool(q_sources) and bool(k_sources) and not q_sources <= k_sources


def _memoised(memo: dict[fx.Node, frozenset[fx.Node]], node: fx.Node, inputs: Callable[[fx.Node], list[fx.Node]],
              compute: Callable[[fx.Node], frozenset[fx.Node]]) -> frozenset[fx.Node]:
    """``compute(node)`` after ``compute`` of everything above it along ``inputs``, into ``memo``
    (iterative depth-first: deep graphs must not hit the recursion limit)."""
    stack = [node]
    while stack:
        current = stack[-1]
        if current in memo:
            stack.pop()
            continue
        pending = [n for n in inputs(current) if n not in memo]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        memo[current] = compute(current)
    return memo[node]


def _walked_inputs(node: fx.Node) -> list[fx.Node]:
    projected = _projection_input(node)
    if projected is not None:
        return []
    return [n for n in node.all_input_nodes if n.op not in ("placeholder", "get_attr")]


def _stream_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors whose tokens ``node``'s rows are: every operand of a ``torch.cat``, the operands
    of a row-wise op that have the result's shape (of a cast, the tensor cast); none for anything
    else (``node`` is a stream)."""
    if node.op == "call_function" and node.target in _CAT:
        return list(node.all_input_nodes)
    row_wise = (node.op == "call_function" and node.target in _ROW_WISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ROW_WISE_METHODS)
    value = example(node)
    if not row_wise or not isinstance(value, torch.Tensor):
        return []
    operands = [node.args[0]] if node.op == "call_method" and node.target in _CASTS else node.all_input_nodes
    return [n for n in operands
            if isinstance(n, fx.Node) and isinstance(example(n), torch.Tensor) and example(n).shape == value.shape]


def _projection_input(node: fx.Node) -> fx.Node | None:
    """The activation a projection node projects, or None if ``node`` is no projection."""
    if node.op != "call_function":
        if node.op == "call_method" and node.target == "matmul" and _is_weight(node.args[1]):
            return node.args[0]
        return None
    if node.target in _LINEAR:
        return node.args[0]
    if node.target is torch.addmm and len(node.args) >= 3 and _is_weight(node.args[2]):
        return node.args[1]
    if node.target in (torch.matmul, operator.matmul) and len(node.args) == 2 and _is_weight(node.args[1]):
        return node.args[0]
    return None


def _is_weight(value) -> bool:
    if not isinstance(value, fx.Node) or value.op not in ("placeholder", "get_attr"):
        return False
    tensor = example(value)
    return isinstance(tensor, torch.Tensor) and tensor.dim() == 2
