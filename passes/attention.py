"""The attention pass: find every attention site in the graph and run it through the plan.

Each ``F.scaled_dot_product_attention`` call and each softmax is examined (``attention_match``);
a site proven to be exactly attention is replaced by ``torch.ops.li.planned_attention`` reading the
plan slot of its signature (``li_compile.plan``: dense until the controller sets a layout), and
recorded in the report as "rewritten". Everything else stays as written, recorded as "skipped"
with the reason: softmaxes that are not attention, cross-attention (keys projected from text or
action tokens: left dense on purpose, the controller prunes the video context), sites needing
gradients (the op is inference-only), sites with symbolic shapes (slots are fixed-size; the
backend hands the passes a static copy per shape, ``li_compile.specialize``, so these remain only in
a graph it could not specialize), sites the rewrite would round otherwise (an fp32 bias on an fp16
site) and ``nn.MultiheadAttention``'s fused call (one node the pass cannot see into: ``OPAQUE``).
``flex_attention`` calls whose ``score_mod`` is the identity are rewritten with their block mask as
the site's mask (``attention_flex``); others stay as written, with the reason. Sites in the body of
a ``torch.compiler.nested_compile_region`` block are rewritten once for all its calls
(``nested_regions``).

Why the torch-level graph (before AOT) and not the aten graph after it:
- the inner compiler is a choice (Inductor, eager, TensorRT); rewriting the graph Dynamo hands the
  backend helps all three, while an aten post-grad pass exists only inside Inductor;
- at torch level, attention is still one node (SDPA) or a short chain with readable spellings,
  and every node carries the user's stack trace for the report; after AOT, SDPA is already
  decomposed or fused differently per backend and version (2.11 vs 2.13);
- the slot tensors enter as buffers of the GraphModule: AOT lifts buffers to inputs passed by
  reference, so in-place plan updates reach the compiled code without recompiling.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import torch
from torch import fx

from li_compile.passes.attention_flex import is_flex_attention, match_flex, with_block_mask
from li_compile.passes.attention_match import AttentionMatch, NotAttention, describe, match_sdpa, match_softmax
from li_compile.passes.attention_rewrite import heads_shape, kv_heads, rewrite_site
from li_compile.passes.attention_spellings import ADD_MASK, Sdpa, Softmax, example, read
from li_compile.passes.attention_streams import TokenStreams
from li_compile.passes.nested_regions import rewrite_nested
from li_compile.passes.sampler_match import view_base, written_base
from li_compile.plan import SlotSignature
from li_compile.reporting import Site, user_location

if TYPE_CHECKING:  # pipeline imports this module to register the pass
    from li_compile.passes.pipeline import PassContext

KIND = "attention"

SPARSITY_OFF = "attention (sparsity.enabled is False: left to the inner compiler)"

# Calls Dynamo keeps as one node whose attention the pass cannot see into: reported as skipped sites
# with detail["opaque"] (the audit counts their calls as unaccelerated).
OPAQUE = {
    torch.nn.functional.multi_head_attention_forward: (
        "nn.MultiheadAttention's fused call (F.multi_head_attention_forward) is opaque to the rewrite: write the "
        "attention with F.scaled_dot_product_attention to have it planned; left as written"),
}


def attention_pass(gm: fx.GraphModule, ctx: "PassContext") -> None:
    """Rewrite every provable attention site of ``gm`` to ``li::planned_attention``, also inside the
    bodies of ``torch.compiler.nested_compile_region`` blocks (once per body); report each."""
    _rewrite_sites(gm, ctx)
    rewrite_nested(gm, lambda body: attention_pass(body, ctx))  # a body may call nested bodies too


def _rewrite_sites(gm: fx.GraphModule, ctx: "PassContext") -> None:
    streams = TokenStreams()
    erased: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        if node.op == "call_function" and node.target in OPAQUE:
            ctx.compilation.sites.append(Site(KIND, "skipped", reason=OPAQUE[node.target], location=location(node),
                                              detail={"opaque": True}))
            continue
        readings = read(node)
        if is_flex_attention(node):
            matcher = functools.partial(match_flex, gm)
        elif any(isinstance(r, Sdpa) for r in readings):
            matcher = match_sdpa
        elif any(isinstance(r, Softmax) for r in readings):
            matcher = match_softmax
        else:
            continue
        try:
            match = matcher(node)
            _check_rewritable(match, streams, ctx.dynamic)
        except NotAttention as exc:
            ctx.compilation.sites.append(Site(KIND, "skipped", reason=str(exc), location=location(node)))
            continue
        if not ctx.options.sparsity.enabled:
            ctx.compilation.sites.append(Site(KIND, "skipped", reason=SPARSITY_OFF, location=location(node)))
            continue
        if match.spelling == "flex_attention":
            match = with_block_mask(gm, match)  # only now: a site left as written gets no extra nodes
        slot = ctx.plan.slot_for(_signature(match, ctx))
        detail = {
            "spelling": match.spelling,
            "slot": slot.id,
            "shape": heads_shape(match),
            "kv_heads": kv_heads(match),
            "masks": len(match.masks),
            "density": ctx.options.sparsity.density,
        }
        where = location(match.out)
        rewrite_site(gm, match, slot, ctx.options.sparsity.density)
        erased.update(match.nodes)
        ctx.compilation.sites.append(Site(KIND, "rewritten", location=where, detail=detail))


def _check_rewritable(match: AttentionMatch, streams: TokenStreams, dynamic: object) -> None:
    """Reasons to leave a real attention site alone."""
    operands = [example(x.node) for x in (match.q, match.k, match.v)]
    if any(t.shape[-1] == 0 or t.shape[-2] == 0 for t in operands if all(isinstance(s, int) for s in t.shape)):
        raise NotAttention("empty attention (head dim or sequence length 0): left as written")
    if any(not isinstance(s, int) for t in operands for s in t.shape):
        raise NotAttention(f"symbolic shapes ({_why_symbolic(dynamic)}): plan slots need static shapes; left as "
                           "written. Fix: torch.compile(..., dynamic=False)")
    lossy = _lossy(match, operands[0].dtype)
    if lossy is not None:
        raise NotAttention(f"{lossy}; left as written")
    if any(t.requires_grad for t in operands):
        raise NotAttention("needs gradients (traced with grad enabled); planned attention is inference-only: left as written")
    written = _written_after_read(match)
    if written is not None:
        raise NotAttention(f"{written}: the rewritten site would read it after the write; left as written")
    if streams.is_cross_attention(match.q.node, match.k.node):
        names = ", ".join(sorted(n.name for n in streams.sources(match.k.node)))
        raise NotAttention(f"cross-attention (keys projected from other tokens: {names}) left dense")


def _written_after_read(match: AttentionMatch) -> str | None:
    """An in-place write, between two of the site's nodes, to a tensor (or a view of one) that an
    earlier node of the site read (``p = softmax(q @ cache.mT)``, then ``cache.index_copy_(...)``, then
    ``p @ v``): the rewritten site runs whole at its output, after the write. None where there is none.
    Conservative: an op that may return its input (``x.float()``) counts as reading that input."""
    nodes, span, node = set(match.nodes), [], match.out
    unseen = set(nodes)
    while unseen and node.op != "root":  # back from the output to the site's first node
        span.append(node)
        unseen.discard(node)
        node = node.prev
    read: set[fx.Node] = set()
    for node in reversed(span):
        if node in nodes:
            read |= {view_base(i, may_alias=True) for i in node.all_input_nodes if i not in nodes}
            continue
        for base in _written(node) & read:
            return f"{node.name} writes {base.name} in place between the scores and the output"
    return None


def _written(node: fx.Node) -> set[fx.Node]:
    """The tensors ``node`` may write in place (through views): the one an in-place spelling names
    (``written_base``), or, for an op whose schema mutates (a custom op with ``mutates_args``), every
    tensor it takes."""
    base = written_base(node)
    if base is not None:  # (through an op that may return its input: cache = keys.detach(); cache.mul_(3))
        return {base, view_base(base, may_alias=True)}
    schema = getattr(node.target, "_schema", None)
    if node.op == "call_function" and (getattr(schema, "is_mutable", False) or node.is_impure()):
        return {view_base(i) for i in node.all_input_nodes}
    return set()


def _lossy(match: AttentionMatch, dtype: torch.dtype) -> str | None:
    """Why the rewrite, which computes in the site's ``dtype`` (q's), would round otherwise than the
    site does, or None. One precision rule (``_coarser``), both ways: a matched node of lower
    precision than ``dtype`` (weights cast to float16 before the values product on float32 inputs:
    the site rounds, the rewrite would not), an additive mask of higher precision (a float32 bias
    added to the float32 scores of a float16 site: the rewrite would round the bias). Casts of the
    scores to higher precision (an fp32 softmax of fp16 scores, cast back) are what the kernel does."""
    for node in match.nodes:
        value = example(node)
        if isinstance(value, torch.Tensor) and _coarser(value.dtype, dtype):
            return (f"{node.name} rounds the attention to {value.dtype} inside a {dtype} site: the rewrite would "
                    f"compute it in {dtype}")
    for mask in match.masks:
        value = example(mask.node)
        if mask.kind == ADD_MASK and _coarser(dtype, value.dtype):
            return (f"the additive mask {mask.node.name} is {value.dtype} on a {dtype} site: the rewrite would round "
                    f"it to {dtype}")
    return None


def _coarser(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether floating dtype ``a`` has less precision than floating dtype ``b``."""
    return a.is_floating_point and b.is_floating_point and torch.finfo(a).eps > torch.finfo(b).eps


def _why_symbolic(dynamic: object) -> str:
    if dynamic is None:
        return ("torch.compile's default dynamic=None turned on automatic dynamic shapes when the model ran at a "
                "second shape, e.g. a second context capacity")
    return f"dynamic={dynamic}"


def _signature(match: AttentionMatch, ctx: "PassContext") -> SlotSignature:
    batch, heads, q_len, kv_len = heads_shape(match)
    device = str(example(match.q.node).device)
    sparsity = ctx.options.sparsity
    return SlotSignature(batch, heads, q_len, kv_len, device, sparsity.block_q, sparsity.block_k)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def location(node: fx.Node) -> str:
    """The user's source line of ``node`` ("file.py:12 in forward"), from Dynamo's stack trace
    (``user_location``: a flex call's innermost frames are inside torch)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return user_location(frames) or describe(node)
