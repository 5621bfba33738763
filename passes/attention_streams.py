"""Self- or cross-attention? Which token streams queries and keys are projected from.

Walking up from a tensor through everything but projections (``F.linear``, ``addmm``, a matmul with
a 2-D weight that is a graph input or attribute), the inputs of the first projection met on each
path are the tensor's *token sources*: the hidden states q, k and v were projected from. Norms,
RoPE, reshapes, casts, ``torch.cat`` with a KV cache and chunking a fused QKV projection are all
walked through. Self-attention projects keys from (at least partly) the same hidden states as the
queries, also when keys are the current chunk concatenated with cached keys, or joint text+video
tokens; cross-attention projects them from other tokens only (text, actions). If either side has no
projection above it (q, k, v given as graph inputs), the site is not called cross-attention.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from li_compile.passes.attention_spellings import example

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)


class TokenStreams:
    """Token sources of nodes in one graph, memoised across the sites of the graph."""

    def __init__(self) -> None:
        self._sources: dict[fx.Node, frozenset[fx.Node]] = {}

    def sources(self, node: fx.Node) -> frozenset[fx.Node]:
        """The hidden states ``node`` was projected from (empty if it was not projected)."""
        stack = [node]
        while stack:  # iterative depth-first: deep graphs must not hit the recursion limit
            current = stack[-1]
            if current in self._sources:
                stack.pop()
                continue
            pending = [n for n in _walked_inputs(current) if n not in self._sources]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self._sources[current] = self._compute(current)
        return self._sources[node]

    def _compute(self, node: fx.Node) -> frozenset[fx.Node]:
        projected = _projection_input(node)
        if projected is not None:
            return frozenset({projected})
        found: set[fx.Node] = set()
        for parent in _walked_inputs(node):
            found |= self._sources[parent]
        return frozenset(found)

    def is_cross_attention(self, q: fx.Node, k: fx.Node) -> bool:
        """True when q and k both come from projections, of disjoint token streams."""
        q_sources, k_sources = self.sources(q), self.sources(k)
        return bool(q_sources) and bool(k_sources) and not (q_sources & k_sources)


def _walked_inputs(node: fx.Node) -> list[fx.Node]:
    projected = _projection_input(node)
    if projected is not None:
        return []
    return [n for n in node.all_input_nodes if n.op not in ("placeholder", "get_attr")]


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

