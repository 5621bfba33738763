"""Is this node exactly attention? The structural matcher behind the attention pass.

Two entry points, each returning an ``AttentionMatch`` or raising ``NotAttention(reason)``:

- ``match_sdpa(node)``: an ``F.scaled_dot_product_attention`` call;
- ``match_softmax(node)``: a hand-written ``softmax(q k^T * scale + mask) v``, whatever its
  spelling (``attention_spellings`` reads each node into a canonical step), found by walking from
  the softmax up to the query-key contraction and down to the value contraction::

      einsum(q, k) -> [cast | scale | permute]* -> [mask | cast | permute]* -> softmax
                   -> [cast | dropout(off) | permute]* -> einsum(p, v)

Axes are tracked by name through every step (einsum labels; matmul is the einsum
``...mk,...kn->...mn``), so transposes, (B, H, L, D) or (B, L, H, D) layouts, heads folded into
the batch and broadcast (shared) key/value heads need no pattern of their own. A site matches only
when it provably is attention: the softmax runs over the key axis, the first contraction sums the
head dim shared by queries and keys, the second sums exactly the key axis against the values, every
mask broadcasts into the scores without enlarging them, and no intermediate is used elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import fx

from li_compile.passes.attention_spellings import (
    ADD_MASK,
    CAST,
    DROP_MASK,
    FINITE_FILL,
    IDENTITY,
    KEEP_MASK,
    PERMUTE,
    REPEAT_INTERLEAVE,
    SCALE,
    Contraction,
    Sdpa,
    Softmax,
    Unary,
    example,
    parse_equation,
    rank,
    read,
)

SCORE_STEPS = (CAST, IDENTITY, SCALE, ADD_MASK, KEEP_MASK, DROP_MASK, FINITE_FILL, PERMUTE)
WEIGHT_STEPS = (CAST, IDENTITY, PERMUTE)
MASKS = (ADD_MASK, KEEP_MASK, DROP_MASK)
MAX_SCORE_STEPS = 16  # a longer chain between contraction and softmax is not attention as written anywhere


class NotAttention(Exception):
    """The node is not (provably) attention; the message says why."""


@dataclass(frozen=True)
class Operand:
    """A tensor taking part in the site, with the name of each of its axes."""

    node: fx.Node
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Mask:
    """A mask node; ``labels`` name the score axes its axes line up with (right-aligned broadcast);
    ``kind``: ADD_MASK (additive float), KEEP_MASK (bool, True = attend) or DROP_MASK (bool, True = -inf)."""

    node: fx.Node
    labels: tuple[str, ...]
    kind: str


@dataclass(frozen=True)
class AttentionMatch:
    """One attention site: ``out[out_labels] = softmax(scale * q.k + masks over key_axis) . v``.

    Axis names: ``batch`` (every axis of the scores but the query and key axes, in the scores'
    order), ``query_axis``, ``key_axis``, ``head_dim`` (summed by q.k), ``value_dim``. ``nodes``: the
    matched nodes that compute ``out`` from q, k, v and the masks (erased once ``out`` is replaced)."""

    spelling: str
    out: fx.Node
    out_labels: tuple[str, ...]
    q: Operand
    k: Operand
    v: Operand
    batch: tuple[str, ...]
    query_axis: str
    key_axis: str
    head_dim: str
    value_dim: str
    masks: tuple[Mask, ...]
    scale: float | None
    is_causal: bool
    nodes: tuple[fx.Node, ...]


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target} ({node.name})"


# ---- F.scaled_dot_product_attention ----------------------------------------------------------


def match_sdpa(node: fx.Node) -> AttentionMatch:
    """An SDPA call, its (..., L, E) operands named ``b0.. i d`` / ``b0.. j d`` / ``b0.. j e``."""
    (call,) = [r for r in read(node) if isinstance(r, Sdpa)]
    q, k, v = call.query, call.key, call.value
    ranks = {rank(x) for x in (q, k, v)}
    if len(ranks) != 1 or None in ranks or min(ranks) < 2:
        raise NotAttention(f"SDPA operands must share one rank >= 2, got ranks {[rank(x) for x in (q, k, v)]}")
    if not (isinstance(call.dropout_p, (int, float)) and call.dropout_p == 0):
        raise NotAttention(f"SDPA with dropout_p={call.dropout_p!r} is stochastic; only dropout_p=0 is rewritten")
    if not isinstance(call.is_causal, bool) or not isinstance(call.enable_gqa, bool):
        raise NotAttention(f"SDPA is_causal/enable_gqa must be constants, got {call.is_causal!r}/{call.enable_gqa!r}")
    if call.scale is not None and not (isinstance(call.scale, (int, float)) and math.isfinite(call.scale)):
        raise NotAttention(f"SDPA scale must be a constant number, got {call.scale!r}")
    batch = tuple(f"b{n}" for n in range(ranks.pop() - 2))
    masks = ()
    if call.attn_mask is not None:
        mask_value = example(call.attn_mask)
        if not isinstance(mask_value, torch.Tensor):
            raise NotAttention(f"SDPA attn_mask must be a tensor, got {call.attn_mask!r}")
        kind = KEEP_MASK if mask_value.dtype == torch.bool else ADD_MASK
        q_shape, k_shape = example(q).shape, example(k).shape
        batch_shape = q_shape[:-2] if call.enable_gqa else torch.broadcast_shapes(q_shape[:-2], k_shape[:-2])
        scores_shape = (*batch_shape, q_shape[-2], k_shape[-2])
        masks = (_mask(call.attn_mask, batch + ("i", "j"), kind, scores_shape),)
    match = sdpa_layout_match("sdpa", node, (q, k, v), batch, masks, None if call.scale is None else float(call.scale),
                              call.is_causal, (node,))
    return _shared_kv_heads(match)


def sdpa_layout_match(spelling: str, out: fx.Node, qkv: tuple[fx.Node, fx.Node, fx.Node], batch: tuple[str, ...],
                      masks: tuple[Mask, ...], scale: float | None, is_causal: bool,
                      nodes: tuple[fx.Node, ...]) -> AttentionMatch:
    """A site whose operands are laid out as SDPA's, ``(*batch, L, E)``: queries ``batch i d``, keys
    ``batch j d``, values ``batch j e``, output ``batch i e``."""
    q, k, v = qkv
    return AttentionMatch(
        spelling=spelling,
        out=out,
        out_labels=batch + ("i", "e"),
        q=Operand(q, batch + ("i", "d")),
        k=Operand(k, batch + ("j", "d")),
        v=Operand(v, batch + ("j", "e")),
        batch=batch,
        query_axis="i",
        key_axis="j",
        head_dim="d",
        value_dim="e",
        masks=masks,
        scale=scale,
        is_causal=is_causal,
        nodes=nodes,
    )


# ---- hand-written softmax(q k^T) v -----------------------------------------------------------


def match_softmax(node: fx.Node) -> AttentionMatch:
    """The attention site whose softmax is ``node``."""
    (softmax,) = [r for r in read(node) if isinstance(r, Softmax)]
    qk_node, qk, steps = _scores_chain(softmax.x, depth=0)
    _check_single_use([qk_node] + [n for n, _ in steps] + [node])
    chain = {qk_node, *(n for n, _ in steps)}
    for step_node, step in steps:
        if isinstance(step.arg, fx.Node) and step.arg in chain:  # s + s: a user once, read twice
            raise NotAttention(f"{step_node.name} combines the scores with themselves ({step.arg.name}), not with a mask")
    operands = _labelled(qk, "s")
    if len(operands) != 3:
        raise NotAttention(f"the scores contract {len(operands) - 1} tensors, attention contracts 2 (queries, keys)")
    (a, b), scores_labels = operands[:2], operands[2].labels

    order, scale, masks = scores_labels, qk.scale, []
    if qk.addend is not None:
        if qk.addend_scale != 1:
            raise NotAttention(f"baddbmm beta={qk.addend_scale} scales the mask; only beta 0 or 1 is rewritten")
        masks.append(_mask(qk.addend, order, ADD_MASK, _shape(qk_node)))
    for step_node, step in steps:
        if step.kind == FINITE_FILL:
            raise NotAttention(
                f"masked_fill with the finite value {step.arg} is not exactly attention masking "
                "(a fully masked row would become uniform); fill with float('-inf') to have it rewritten"
            )
        if step.kind == SCALE:
            if masks:
                raise NotAttention("the scores are scaled after a mask is applied; scale before masking to have it rewritten")
            scale *= step.arg
        elif step.kind in MASKS:
            masks.append(_mask(step.arg, order, step.kind, _shape(step_node)))
        elif step.kind == PERMUTE:
            order = tuple(order[p] for p in step.arg)
    key_axis = order[softmax.dim % len(order)]

    k_op, q_op = (a, b) if key_axis in a.labels else (b, a)
    if key_axis in q_op.labels:
        raise NotAttention(f"the softmax runs over axis {key_axis!r}, which both contraction operands carry (a batch axis)")
    summed = (set(a.labels) | set(b.labels)) - set(scores_labels)
    if len(summed) != 1 or not all(s in q_op.labels and s in k_op.labels for s in summed):
        raise NotAttention(
            f"the query-key contraction must sum exactly one axis both operands carry (the head dim), sums {sorted(summed)}"
        )
    (head_dim,) = summed
    query_only = [lab for lab in scores_labels if lab in q_op.labels and lab not in k_op.labels]
    if not query_only:
        raise NotAttention("the scores have no query axis (every axis but the key axis is shared with the keys)")
    query_axis = query_only[-1]  # any other query-only axis is a batch axis the keys share (MQA)
    batch = tuple(lab for lab in scores_labels if lab not in (query_axis, key_axis))

    pv_node, pv, p_node, p_order, weight_nodes = _weights_chain(node, order)
    out_labels, v_op, value_dim = _values_contraction(pv_node, pv, p_node, p_order, key_axis, query_axis, batch)
    match = AttentionMatch(
        spelling=_spelling(qk_node),
        out=pv_node,
        out_labels=out_labels,
        q=q_op,
        k=k_op,
        v=v_op,
        batch=batch,
        query_axis=query_axis,
        key_axis=key_axis,
        head_dim=head_dim,
        value_dim=value_dim,
        masks=tuple(masks),
        scale=scale,
        is_causal=False,
        nodes=(qk_node, *(n for n, _ in steps), node, *weight_nodes, pv_node),
    )
    return _shared_kv_heads(match)


def _scores_chain(node: fx.Node, depth: int) -> tuple[fx.Node, Contraction, list[tuple[fx.Node, Unary]]]:
    """Walk up from the softmax input to the contraction: (its node, reading, steps in order)."""
    if depth > MAX_SCORE_STEPS:
        raise NotAttention(f"no query-key contraction within {MAX_SCORE_STEPS} steps above the softmax")
    readings = read(node)
    for reading in readings:
        if isinstance(reading, Contraction):
            return node, reading, []
    failures = []
    for reading in readings:
        if isinstance(reading, Unary) and reading.kind in SCORE_STEPS:
            try:
                qk_node, qk, steps = _scores_chain(reading.x, depth + 1)
            except NotAttention as exc:
                failures.append(exc)
                continue
            _check_same_shape(reading, node)
            return qk_node, qk, steps + [(node, reading)]
    if failures:
        raise failures[0]
    raise NotAttention(f"the softmax input comes from {describe(node)}, not from a contraction of queries and keys")


def _weights_chain(softmax: fx.Node, order: tuple[str, ...]):
    """Walk down from the softmax to the value contraction through casts, identities, permutes."""
    node, nodes = softmax, []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise NotAttention(
                f"the attention weights ({node.name}) have {len(users)} users; attention uses them once, against the values"
            )
        (user,) = users
        readings = read(user)
        contraction = next((r for r in readings if isinstance(r, Contraction)), None)
        if contraction is not None:
            return user, contraction, node, order, nodes
        step = next(
            (r for r in readings if isinstance(r, Unary) and r.kind in WEIGHT_STEPS and r.x is node and not r.inplace), None
        )
        if step is None:
            raise NotAttention(f"the softmax feeds {describe(user)}, not a contraction with values")
        if step.kind == PERMUTE:
            order = tuple(order[p] for p in step.arg)
        node = user
        nodes.append(user)


def _values_contraction(pv_node, pv: Contraction, p_node, p_order, key_axis, query_axis, batch):
    """Check that ``pv`` sums exactly the key axis of the weights against the values."""
    if pv.scale != 1 or pv.addend is not None:
        raise NotAttention("the weights-values contraction is scaled or adds a term (baddbmm alpha/beta)")
    if len(pv.operands) != 2 or list(pv.operands).count(p_node) != 1:
        raise NotAttention("the attention weights must be one of exactly two operands of the values contraction")
    local = _labelled(pv, "v")
    p_index = pv.operands.index(p_node)
    rename = dict(zip(local[p_index].labels, p_order))
    v_local = local[1 - p_index]
    for lab in v_local.labels + local[2].labels:
        rename.setdefault(lab, lab)
    p_labels = tuple(rename[x] for x in local[p_index].labels)
    v_labels = tuple(rename[x] for x in v_local.labels)
    out_labels = tuple(rename[x] for x in local[2].labels)
    summed = (set(p_labels) | set(v_labels)) - set(out_labels)
    if summed != {key_axis} or key_axis not in v_labels:
        raise NotAttention(f"the values contraction sums {sorted(summed)}, attention sums the key axis {key_axis!r} only")
    value_only = [lab for lab in v_labels if lab not in p_labels]
    if len(value_only) != 1:
        raise NotAttention(f"the values must carry exactly one axis of their own (the value dim), carry {value_only}")
    if query_axis in v_labels:
        raise NotAttention("the values are indexed by the query axis")
    if not set(v_labels) - {key_axis, value_only[0]} <= set(batch):
        raise NotAttention("the values carry an axis the scores do not")
    return out_labels, Operand(v_local.node, v_labels), value_only[0]


def _shared_kv_heads(match: AttentionMatch) -> AttentionMatch:
    """Keys and values repeated along the heads axis (GQA spelled ``repeat_interleave(g, dim=heads)``,
    possibly permuted after) become their un-repeated tensors: the op shares each key/value head
    among ``g`` query heads itself (head h reads kv head h // g, as repeat_interleave does)."""
    if not match.batch:
        return match
    heads = match.batch[-1]
    k, v = _unrepeated(match.k, heads), _unrepeated(match.v, heads)
    if k is None or v is None or k[1] != v[1]:
        return match
    return replace(match, k=k[0], v=v[0])


def _unrepeated(operand: Operand, heads: str) -> tuple[Operand, int] | None:
    node, labels = operand.node, operand.labels
    for reading in read(node):
        if isinstance(reading, Unary) and reading.kind == PERMUTE:
            node, unpermuted = reading.x, [None] * len(labels)
            for out_axis, in_axis in enumerate(reading.arg):
                unpermuted[in_axis] = labels[out_axis]
            labels = tuple(unpermuted)
            break
    for reading in read(node):
        if isinstance(reading, Unary) and reading.kind == REPEAT_INTERLEAVE and labels[reading.arg[1]] == heads:
            return Operand(reading.x, labels), reading.arg[0]
    return None


# ---- helpers ---------------------------------------------------------------------------------


def _labelled(contraction: Contraction, prefix: str) -> list[Operand]:
    """The contraction's operands and its output (last, with node None) with prefixed axis labels."""
    ranks = [rank(op) for op in contraction.operands]
    try:
        inputs, output = parse_equation(contraction.equation, ranks)
    except ValueError as exc:
        raise NotAttention(str(exc)) from exc
    for labels in (*inputs, output):
        if len(set(labels)) != len(labels):
            raise NotAttention(f"einsum {contraction.equation!r} repeats a label (a diagonal), which attention never does")
    named = [Operand(op, tuple(f"{prefix}:{x}" for x in labels)) for op, labels in zip(contraction.operands, inputs)]
    return named + [Operand(None, tuple(f"{prefix}:{x}" for x in output))]


def _mask(mask: fx.Node, order: tuple[str, ...], kind: str, scores_shape: tuple[int, ...]) -> Mask:
    """``mask`` applied to scores of ``scores_shape`` whose axes are named ``order``."""
    value = example(mask)
    if not isinstance(value, torch.Tensor):
        raise NotAttention(f"the mask {mask!r} is not a tensor")
    if kind == ADD_MASK and not value.dtype.is_floating_point:
        raise NotAttention(f"an additive mask must be floating point, {mask.name} is {value.dtype}")
    if kind != ADD_MASK and value.dtype != torch.bool:
        raise NotAttention(f"a fill mask must be bool, {mask.name} is {value.dtype}")
    if value.dim() > len(order):
        raise NotAttention(f"mask {mask.name} has more axes ({value.dim()}) than the scores ({len(order)})")
    if any(m not in (1, s) for m, s in zip(reversed(value.shape), reversed(scores_shape))):
        raise NotAttention(f"mask {mask.name} {tuple(value.shape)} does not broadcast into the scores {scores_shape}")
    return Mask(mask, order[len(order) - value.dim() :], kind)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(example(node).shape)


def _check_same_shape(step: Unary, node: fx.Node) -> None:
    before, after = example(step.x), example(node)
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        raise NotAttention(f"{describe(node)} has no recorded tensor value")
    if step.kind == PERMUTE:
        expected = tuple(before.shape[p] for p in step.arg)
    else:
        expected = tuple(before.shape)
    if tuple(after.shape) != expected:
        raise NotAttention(f"{describe(node)} changes the scores' shape {tuple(before.shape)} -> {tuple(after.shape)}")


def _check_single_use(nodes: Iterable[fx.Node]) -> None:
    for node in nodes:
        if len(node.users) != 1:
            raise NotAttention(f"the intermediate {node.name} is also used elsewhere ({len(node.users)} users)")


def _spelling(qk_node: fx.Node) -> str:
    target = qk_node.target if isinstance(qk_node.target, str) else getattr(qk_node.target, "__name__", "")
    return {"matmul": "matmul", "bmm": "bmm", "baddbmm": "baddbmm", "einsum": "einsum"}.get(target, target)
