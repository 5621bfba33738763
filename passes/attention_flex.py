"""``flex_attention`` calls as attention sites: their ``BlockMask`` becomes a bool mask of the site.

Dynamo traces ``flex_attention(q, k, v, score_mod, block_mask, scale)`` to one higher-order op call
whose block mask is flattened into a tuple (its sequence lengths, the BCSR tensors of partial and
full key blocks, its block sizes and its ``mask_mod`` as a graph) and whose ``score_mod`` is a graph.
A call is rewritten exactly when:

- ``score_mod`` is the identity (it returns the score it is given): a mask is all the call applies;
- only the output is used (a log-sum-exp or row max asked for but never read is dropped);
- the mask the block mask stands for fits ``MAX_MASK_ELEMENTS``.

A call without a block mask (Dynamo passes FlexAttention's default: one listed block of
``_LARGE_SPARSE_BLOCK_SIZE`` tokens whose ``mask_mod`` is always True) masks nothing: it is
rewritten as unmasked attention, and no mask is built.

Its mask is then built in the graph, with FlexAttention's semantics: a key is visible where its
block is listed as full, or listed as partial and ``mask_mod(b, h, q_idx, kv_idx)`` is True
(``mask_mod`` evaluated over broadcast index grids, as ``create_mask`` does). The site is matched as
SDPA with that bool mask (``AttentionMatch``), so the attention pass rewrites it to
``li::planned_attention`` like any other: the controller's plan is intersected with the user's mask
by the op. Rows that see no key give zeros, as FlexAttention's do. Everything else stays as
written, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
from torch import fx

from li_compile.passes.attention_match import AttentionMatch, Mask, NotAttention, sdpa_layout_match
from li_compile.passes.attention_rewrite import Emitter
from li_compile.passes.attention_spellings import KEEP_MASK, example
from li_compile.passes.sampler_match import written_base

MAX_MASK_ELEMENTS = 1 << 26  # a materialised mask above this (64 MiB of bool) is not worth the rewrite
LABELS = ("b0", "b1")


def is_flex_attention(node: fx.Node) -> bool:
    """Whether ``node`` calls FlexAttention (the higher-order op Dynamo traces ``flex_attention`` to)."""
    return node.op == "call_function" and getattr(node.target, "__name__", None) == "flex_attention" and isinstance(
        node.target, torch._ops.HigherOrderOperator)


def match_flex(gm: fx.GraphModule, node: fx.Node) -> AttentionMatch:
    """The flex call ``node`` as an SDPA-like site, its block mask not applied yet (``with_block_mask``
    adds it, once the attention pass has checked the site). ``NotAttention`` names what is not
    rewritable."""
    q, k, v, score_mod, block_mask, scale = node.args[:6]
    for user in list(node.users):  # a log-sum-exp asked for (return_lse=True) but never read: dead code
        if user.target is operator.getitem and user.args[1] != 0 and _unread(user):
            _erase_with_users(gm, user)
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        raise NotAttention("flex_attention's log-sum-exp or row max is used: only its output can be rewritten; "
                           "left as written")
    if not _is_identity(gm, score_mod):
        raise NotAttention("flex_attention's score_mod changes the scores (not a mask): left as written")
    if not isinstance(scale, (int, float)):
        raise NotAttention(f"flex_attention's scale must be a constant number, got {scale!r}")
    values = [example(x) for x in (q, k, v)]
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in values):
        raise NotAttention("flex_attention operands must be 4-D (B, H, L, D) tensors")
    blocks = _block_mask(block_mask)
    if not _masks_nothing(gm, blocks, values[0].shape[2], values[1].shape[2]):
        _check_expandable(_mask_shape(gm, blocks, values[0], values[1]))
    return sdpa_layout_match("flex_attention", users[0], (q, k, v), LABELS, (), float(scale), False, (node, users[0]))


def _unread(node: fx.Node) -> bool:
    """Whether nothing reads ``node``: no users, or only calls that write nothing (no in-place op,
    no ``out=``, nothing impure) and that nothing reads in turn."""
    writes = node.is_impure() or written_base(node) is not None
    return node.op in ("call_function", "call_method") and not writes and all(_unread(u) for u in node.users)


def _erase_with_users(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase ``node`` (``_unread``) and everything computed from it, users first."""
    for user in list(node.users):
        if user in node.users:  # (not erased already through another of its inputs)
            _erase_with_users(gm, user)
    gm.graph.erase_node(node)


def with_block_mask(gm: fx.GraphModule, match: AttentionMatch) -> AttentionMatch:
    """``match`` (of ``match_flex``) with its call's block mask as a bool mask, computed by nodes
    inserted before the call (``flex_visibility``); unchanged if the block mask masks nothing."""
    node = match.nodes[0]
    blocks = _block_mask(node.args[4])
    q_value, k_value = example(match.q.node), example(match.k.node)
    if _masks_nothing(gm, blocks, q_value.shape[2], k_value.shape[2]):
        return match
    buffers = tuple(node.args[8]) if len(node.args) > 8 else ()
    shape = _mask_shape(gm, blocks, q_value, k_value)
    mask = _emit_mask(gm, node, blocks, buffers, q_value.device, shape)
    return replace(match, masks=(Mask(mask, LABELS + ("i", "j"), KEEP_MASK),))


def flex_visibility(mod_mask: torch.Tensor, kv_num: torch.Tensor, kv_idx: torch.Tensor,
                    full_num: torch.Tensor | None, full_idx: torch.Tensor | None, q_block: int, kv_block: int,
                    q_len: int, kv_len: int) -> torch.Tensor:
    """The keys a FlexAttention block mask lets each query see: ``(B|1, H|1, Lq, Lk)`` bool, True in
    listed full blocks and where ``mod_mask`` (``mask_mod`` over the token grid, broadcastable) is
    True in listed partial blocks. ``kv_num (B|1, H|1, Q)``, ``kv_idx (B|1, H|1, Q, M)``: the partial
    blocks; ``full_*`` the full ones (or None)."""
    kv_blocks = -(-kv_len // kv_block)
    visible = _tokens(_listed(kv_num, kv_idx, kv_blocks), q_block, kv_block, q_len, kv_len) & mod_mask
    if full_num is not None:
        visible = visible | _tokens(_listed(full_num, full_idx, kv_blocks), q_block, kv_block, q_len, kv_len)
    return visible


def _listed(num: torch.Tensor, idx: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """``(..., Q)`` counts and ``(..., Q, M)`` indices -> ``(..., Q, kv_blocks)`` bool of the listed blocks
    (a listed block past the keys holds no key: it is dropped)."""
    listed = (torch.arange(idx.shape[-1], device=idx.device) < num[..., None]) & (idx < kv_blocks)
    target = torch.where(listed, idx.long(), kv_blocks)  # unlisted entries land in a spare column
    spare = torch.zeros(*idx.shape[:-1], kv_blocks + 1, dtype=torch.bool, device=idx.device)
    return spare.scatter(-1, target, True)[..., :kv_blocks]


def _tokens(blocks: torch.Tensor, q_block: int, kv_block: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Block-level ``(..., Q, K)`` -> token-level ``(..., q_len, kv_len)``: token (i, j) reads block
    (i // q_block, j // kv_block), so nothing larger than the result is allocated whatever the block sizes."""
    rows = torch.arange(q_len, device=blocks.device) // q_block
    cols = torch.arange(kv_len, device=blocks.device) // kv_block
    return blocks[..., rows[:, None], cols]


def _mask_shape(gm: fx.GraphModule, blocks: dict, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    """The token mask's ``(B|1, H|1, Lq, Lk)``: a batch or head axis is the queries' where the block
    tables have it or ``mask_mod`` reads its index (a mask broadcast over heads, ``H=None``, whose
    ``mask_mod`` still reads ``h``: FlexAttention calls it with every query head), else 1."""
    kv_num = example(blocks["kv_num"])
    graph = gm.get_submodule(blocks["mask_mod"].target).graph
    indices = [n for n in graph.nodes if n.op == "placeholder"][:2]
    reads = [len(indices) > axis and bool(indices[axis].users) for axis in (0, 1)]
    batch, heads = (q.shape[axis] if kv_num.shape[axis] > 1 or reads[axis] else 1 for axis in (0, 1))
    return batch, heads, q.shape[2], k.shape[2]


def _check_expandable(shape: tuple[int, int, int, int]) -> None:
    """Refuse a block mask whose token mask ``shape`` would be too large to build."""
    elements = shape[0] * shape[1] * shape[2] * shape[3]
    if elements > MAX_MASK_ELEMENTS:
        raise NotAttention(f"flex_attention's block mask would expand to {elements} mask elements (more than "
                           f"{MAX_MASK_ELEMENTS}): left as written")


def _masks_nothing(gm: fx.GraphModule, blocks: dict, q_len: int, kv_len: int) -> bool:
    """Whether the block mask lets every query see every key: FlexAttention's default for a call
    without one (``torch.ones`` / ``torch.zeros`` tables listing one block that spans all tokens, a
    ``mask_mod`` that returns True)."""
    one_block = blocks["q_block"] >= q_len and blocks["kv_block"] >= kv_len
    constant_tables = (blocks["kv_num"].target is torch.ones and blocks["kv_idx"].target is torch.zeros
                       and blocks["full_num"] is None)
    return one_block and constant_tables and _returns_true(gm, blocks["mask_mod"])


def _returns_true(gm: fx.GraphModule, mask_mod: fx.Node) -> bool:
    """Whether the ``mask_mod`` graph returns a constant True (FlexAttention's ``noop_mask``)."""
    (output,) = [n for n in gm.get_submodule(mask_mod.target).graph.nodes if n.op == "output"]
    result = output.args[0]
    return isinstance(result, fx.Node) and result.op == "call_method" and result.target == "new_ones" and \
        result.kwargs.get("dtype") is torch.bool


def _is_identity(gm: fx.GraphModule, score_mod: object) -> bool:
    """Whether ``score_mod`` (a get_attr of a graph) returns its first input (the score) unchanged."""
    if not isinstance(score_mod, fx.Node) or score_mod.op != "get_attr":
        return False
    graph = gm.get_submodule(score_mod.target).graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    result = output.args[0]
    return bool(inputs) and (result is inputs[0] or (isinstance(result, (tuple, list)) and len(result) == 1
                                                     and result[0] is inputs[0]))


def _block_mask(flat: object) -> dict[str, object]:
    """The parts of a flattened ``BlockMask``: its first four tensors (after its sequence lengths) are
    the partial and full key-block counts and indices; the last three entries the query and key block
    sizes and ``mask_mod``."""
    if not isinstance(flat, (tuple, list)):
        raise NotAttention(f"flex_attention's block mask is not a flattened BlockMask: {flat!r}")
    first = next((i for i, x in enumerate(flat) if isinstance(x, fx.Node) and isinstance(example(x), torch.Tensor)), None)
    if first is None or len(flat) < first + 7:
        raise NotAttention("flex_attention's block mask has no block tensors in a layout this pass knows")
    kv_num, kv_idx, full_num, full_idx = flat[first:first + 4]
    q_block, kv_block, mask_mod = flat[-3:]
    if not (isinstance(q_block, int) and isinstance(kv_block, int) and isinstance(mask_mod, fx.Node)
            and mask_mod.op == "get_attr" and isinstance(kv_num, fx.Node) and isinstance(kv_idx, fx.Node)):
        raise NotAttention("flex_attention's block mask is laid out in a way this pass does not know")
    return dict(kv_num=kv_num, kv_idx=kv_idx, full_num=full_num, full_idx=full_idx, q_block=q_block,
                kv_block=kv_block, mask_mod=mask_mod)


def _emit_mask(gm: fx.GraphModule, node: fx.Node, blocks: dict, buffers: tuple, device: torch.device,
               shape: tuple[int, int, int, int]) -> fx.Node:
    """Nodes before ``node`` that compute the block mask's token mask (``flex_visibility``)."""
    em = Emitter(gm, node)
    grids = []
    for axis, size in enumerate(shape):
        view = [1, 1, 1, 1]
        view[axis] = size
        index = em.function(torch.arange, size, device=device)
        grids.append(em.method("view", index, *view))
    mod_mask = em.module(blocks["mask_mod"].target, *grids, *buffers)
    return em.function(flex_visibility, mod_mask, blocks["kv_num"], blocks["kv_idx"], blocks["full_num"],
                       blocks["full_idx"], blocks["q_block"], blocks["kv_block"], shape[2], shape[3])
