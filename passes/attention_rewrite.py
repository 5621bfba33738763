"""Replace one matched attention site by ``torch.ops.li.planned_attention`` on its plan slot.

The op takes the normalised layout ``q: (B, H, Lq, D)``, ``k``/``v``: ``(B, Hkv, Lk, D)``; the site's
own axes are brought there with views: missing axes become size-1 axes, a permute puts them in
(batch..., sequence, dim) order, and the batch axes fold into (B, H) — the last batch axis (heads)
becomes H, the others multiply into B (none: B = H = 1; one, as in (B*H, L, D): B = 1). Keys and
values keep a size-1 or smaller (GQA) head axis, so the kernel shares them instead of copies. Masks
keep their broadcast axes. The result goes back to the site's own layout and dtype, and the nodes the
site consisted of are erased. Every inserted node gets ``example_value`` and the site's stack trace.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable

import torch
from torch import fx

import li_compile.planned_attention  # noqa: F401  (registers torch.ops.li.planned_attention)
from li_compile.passes.attention_match import AttentionMatch, Operand
from li_compile.passes.attention_spellings import ADD_MASK, DROP_MASK, example, is_droppable
from li_compile.plan import SLOT_TENSORS, PlanSlot

PLAN_BUFFER_PREFIX = "li_plan_slot"  # graph-module buffers holding plan slot tensors


def axis_sizes(match: AttentionMatch) -> dict[str, int]:
    """Size of every named axis of the site (the largest over q, k, v: smaller ones broadcast)."""
    sizes: dict[str, int] = {}
    for operand in (match.q, match.k, match.v):
        for label, size in zip(operand.labels, example(operand.node).shape):
            sizes[label] = max(sizes.get(label, 1), size)
    return sizes


def heads_shape(match: AttentionMatch) -> tuple[int, int, int, int]:
    """The site's (B, H, Lq, Lk) in the normalised layout."""
    sizes = axis_sizes(match)
    lead, head = match.batch[:-1], match.batch[-1:]
    batch = math.prod(sizes[b] for b in lead)
    heads = sizes[head[0]] if head else 1
    return batch, heads, sizes[match.query_axis], sizes[match.key_axis]


def kv_heads(match: AttentionMatch) -> int:
    """How many key/value heads the op gets (fewer than H: GQA/MQA, shared by the kernel)."""
    if not match.batch or match.batch[-1] not in match.k.labels:
        return 1
    return example(match.k.node).shape[match.k.labels.index(match.batch[-1])]


def rewrite_site(gm: fx.GraphModule, match: AttentionMatch, slot: PlanSlot, density: float) -> fx.Node:
    """Replace ``match.out`` by a ``planned_attention`` call on ``slot`` (top-k ``density`` of the
    plan's blocks: ``sparsity.density``); returns the new output node."""
    em = Emitter(gm, match.out)
    sizes = axis_sizes(match)
    seq_q, seq_k, dim, value_dim = match.query_axis, match.key_axis, match.head_dim, match.value_dim
    q = _to_heads(em, match.q, sizes, match.batch, (seq_q, dim), expand_lead=True, expand_head=True)
    k = _to_heads(em, match.k, sizes, match.batch, (seq_k, dim), expand_lead=True, expand_head=False)
    v = _to_heads(em, match.v, sizes, match.batch, (seq_k, value_dim), expand_lead=True, expand_head=False)
    dtype = example(q).dtype
    k, v = (x if example(x).dtype == dtype else em.method("to", x, dtype) for x in (k, v))
    mask = _combined_mask(em, match, sizes, dtype)
    buffers = [em.buffer(f"{PLAN_BUFFER_PREFIX}{slot.id}_{name}", t) for name, t in zip(SLOT_TENSORS, slot.tensors())]
    out = em.function(
        torch.ops.li.planned_attention.default, q, k, v, mask, *buffers, match.scale, match.is_causal, slot.id,
        density,
    )
    out = _from_heads(em, out, match, sizes)
    match.out.replace_all_uses_with(out)
    _erase(gm.graph, match.nodes)
    return out


def _to_heads(em, operand: Operand, sizes, batch, last2, *, expand_lead: bool, expand_head: bool) -> fx.Node:
    """``operand`` as (B, H, X, Y): axes ``batch + last2``; size-1 axes expand only where asked
    (``expand_lead=False``: only if B's axes mix broadcast and full sizes, which no view can fold)."""
    node, labels = operand.node, list(operand.labels)
    own = dict(zip(labels, example(node).shape))
    target = list(batch) + list(last2)
    for label in target:
        if label not in own:
            node = em.method("unsqueeze", node, -1)
            labels.append(label)
            own[label] = 1
    perm = [labels.index(label) for label in target]
    if perm != list(range(len(perm))):
        node = em.method("permute", node, *perm)
    lead, head = list(batch[:-1]), list(batch[-1:])
    want = [own[label] for label in target]
    mixed = len({own[label] == 1 for label in lead}) > 1
    if expand_lead or mixed:
        want[: len(lead)] = [sizes[label] for label in lead]
    if expand_head and head:
        want[len(lead)] = sizes[head[0]]
    if want != [own[label] for label in target]:
        node = em.method("expand", node, *want)
    shape = [math.prod(want[: len(lead)]), want[len(lead)] if head else 1, *want[len(batch) :]]
    if shape != want:
        node = em.method("reshape", node, *shape)
    return node


def _from_heads(em, out: fx.Node, match: AttentionMatch, sizes) -> fx.Node:
    labels = list(match.batch) + [match.query_axis, match.value_dim]
    shape = [sizes[label] for label in labels]
    if list(example(out).shape) != shape:
        out = em.method("reshape", out, *shape)
    perm = [labels.index(label) for label in match.out_labels]
    if perm != list(range(len(perm))):
        out = em.method("contiguous", em.method("permute", out, *perm))
    original = example(match.out)
    if example(out).dtype != original.dtype:
        out = em.method("to", out, original.dtype)
    if example(out).shape != original.shape:
        raise AssertionError(f"rewritten attention has shape {tuple(example(out).shape)}, the site {tuple(original.shape)}")
    return out


def _combined_mask(em, match: AttentionMatch, sizes, dtype: torch.dtype) -> fx.Node | None:
    """All of the site's masks as one: bool (True = attend) if all are bool, else additive in ``dtype``."""
    keep, add = [], []
    for mask in match.masks:
        node = _to_heads(
            em, Operand(mask.node, mask.labels), sizes, match.batch, (match.query_axis, match.key_axis),
            expand_lead=False, expand_head=False,
        )
        if mask.kind == ADD_MASK:
            add.append(node if example(node).dtype == dtype else em.method("to", node, dtype))
        else:
            keep.append(em.function(torch.logical_not, node) if mask.kind == DROP_MASK else node)
    keep_all = functools.reduce(lambda a, b: em.function(torch.logical_and, a, b), keep) if keep else None
    add_all = functools.reduce(lambda a, b: em.function(operator.add, a, b), add) if add else None
    if keep_all is not None and add_all is not None:
        return em.function(torch.where, keep_all, add_all, float("-inf"))
    return keep_all if keep_all is not None else add_all


def _erase(graph: fx.Graph, nodes) -> None:
    """Erase the site's nodes, then any view/cast above them that nothing uses any more."""
    erased, candidates = set(), []
    for node in reversed(nodes):
        candidates.extend(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)
    while candidates:
        node = candidates.pop()
        if node not in erased and not node.users and is_droppable(node):
            candidates.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)


def is_plan_buffer(node: fx.Node) -> bool:
    """Whether ``node`` reads a plan slot tensor registered by a rewrite (``Emitter.buffer``)."""
    return node.op == "get_attr" and str(node.target).startswith(PLAN_BUFFER_PREFIX)


class Emitter:
    """Inserts nodes before ``anchor`` with their fake ``example_value`` and the anchor's stack trace."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node) -> None:
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor
        value = example(anchor)
        value = value[0] if isinstance(value, (tuple, list)) and value else value  # a multi-output op
        self.fake_mode = getattr(value, "fake_mode", None)

    def method(self, name: str, *args: Any) -> fx.Node:
        return self._insert("call_method", name, args, {}, lambda self_, *rest: getattr(self_, name)(*rest))

    def function(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self._insert("call_function", fn, args, kwargs, fn)

    def module(self, name: str, *args: Any) -> fx.Node:
        """A call of the graph module's submodule ``name``."""
        return self._insert("call_module", name, args, {}, self.gm.get_submodule(name))

    def buffer(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A get_attr of ``tensor``, registered once as a buffer of the graph module (so Inductor
        passes it by reference as an input: in-place updates stay visible)."""
        existing = next((n for n in self.graph.nodes if n.op == "get_attr" and n.target == name), None)
        if existing is not None:  # another site of the same slot already reads it
            return existing
        self.gm.register_buffer(name, tensor)
        first_op = next(n for n in self.graph.nodes if n.op != "placeholder" and not is_plan_buffer(n))
        with self.graph.inserting_before(first_op):
            node = self.graph.get_attr(name)
        if self.fake_mode is not None:
            node.meta["example_value"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        return node

    def _insert(self, op: str, target: Any, args: tuple, kwargs: dict, run: Callable) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        values = fx.node.map_arg((args, kwargs), example)
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["example_value"] = run(*values[0], **values[1])
        return node
