"""Find the sampler in a torch-level FX graph: the timestep input of a denoiser, and the per-step
model outputs of an unrolled denoising loop.

Two granularities, as users compile them:

- **transformer only**: the graph is one model call. Its *timestep input* is a non-parameter input
  of shape ``()`` or ``(B,)`` (or, when there is none, ``(B, F)``: one per frame, diffusion forcing,
  with ``F`` the size of exactly one latent axis) that reaches a ``sin``/``cos`` (the sinusoidal timestep embedding)
  through at most ``EMBEDDING_HOPS`` nodes, or, failing that, one named like a timestep
  (``timestep``, ``t``, ``sigma``, ...). Its *latent input* is the input shaped like the single
  output (a denoiser predicts noise, velocity or x0: all latent-shaped); where several are (context
  frames as many as the chunk's), the one of them named like a noisy latent (``x``, ``latents``,
  ``sample``, ...), else none: the site is skipped rather than keyed on a guess.
- **chunk function**: the graph is the whole chunk generation with its denoising loop unrolled.
  A *step* is an update ``x ± c * v`` (either order; ``c`` a scalar-like factor) where ``v`` is
  latent-shaped and computed from ``x`` by a model piece that sees a timestep: the flow-matching
  Euler step ``x + (s' - s) * v`` and the ``x0 = x - s * v`` of predict-and-renoise samplers both
  have it. An update inside another one's model piece (guidance ``u + g * (c - u)``, a residual
  ``h + c * f(h)`` inside the model) belongs to that model call. Steps must chain: the first
  step's ``x`` comes from an input through pointwise ops and views, each later step's ``x``
  from the previous update the same way. The step's *model piece* is every node that only serves
  ``v``: what a cache hit may skip.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx

from li_compile.denoise_runtime import frame_axis

EMBEDDING_HOPS = 12  # nodes between the timestep input and its sin/cos
TIMESTEP_NAME = re.compile(r"^(l_|g_)?_*(t|ts|timesteps?|sigmas?|noise_levels?|time)_*$", re.IGNORECASE)
LATENT_NAME = re.compile(r"^(l_|g_)?_*(x|xt|x_t|z|zt|z_t|latents?|noisy\w*|samples?|hidden_states)_*$", re.IGNORECASE)
_SIN_COS = {torch.sin, torch.cos, "sin", "cos"}
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_MUL = {operator.mul, torch.mul, "mul"}
_POINTWISE = _ADD | _SUB | _MUL | {operator.truediv, torch.div, "div", operator.neg, torch.neg, "neg", "to", "float",
                                   "half", "bfloat16", "type", "clone", "contiguous", "type_as", torch.lerp, "lerp"}


class NotSampler(Exception):
    """Why a graph is not a sampler site we can cache; the message is the reason. ``relevant``:
    the graph looked like a sampler (a timestep input, a denoising update), so the report shows why."""

    def __init__(self, reason: str, relevant: bool = True) -> None:
        super().__init__(reason)
        self.relevant = relevant


@dataclass
class TransformerSite:
    """One model call: the positions of its latent and timestep inputs among the graph inputs."""

    latent_index: int
    timestep_index: int
    timestep_name: str
    found_by: str  # "sin/cos embedding" or "name"
    per_frame: bool = False  # timesteps (B, F): each frame its own noise level (diffusion forcing)


@dataclass
class Step:
    """One denoising step of an unrolled loop: the latent ``x`` entering it, the model output ``v``,
    the update node and the nodes that only serve ``v`` (the model piece, in graph order)."""

    x: fx.Node
    v: fx.Node
    update: fx.Node
    piece: list[fx.Node]


def value(node: object) -> object:
    """The example value Dynamo recorded for ``node`` (a FakeTensor, a number, ...), or ``node``
    itself for constants."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _target(node: fx.Node) -> object:
    return node.target if node.op in ("call_function", "call_method") else None


def is_parameter(node: fx.Node) -> bool:
    """A graph input that is a parameter or buffer of a module (Dynamo's ``grapharg`` source)."""
    ex = value(node)
    if isinstance(ex, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return source is not None and ("_parameters" in source.name or "_buffers" in source.name)


def _scalar_like(x: object) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    ex = value(x)
    return isinstance(ex, torch.Tensor) and ex.numel() == 1


def _same_shape(a: object, b: object) -> bool:
    ea, eb = value(a), value(b)
    return isinstance(ea, torch.Tensor) and isinstance(eb, torch.Tensor) and ea.shape == eb.shape


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift}
_VIEWS = {operator.getitem, "view", "reshape", "transpose", "permute", "flatten", "unflatten", "squeeze",
          "unsqueeze", "expand", "expand_as", "narrow", "select", "unbind", "chunk", "split", "view_as", "movedim",
          "swapaxes", "swapdims", "t", "adjoint", "diagonal", "unfold", "as_strided",
          torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze, torch.unsqueeze,
          torch.narrow, torch.select, torch.chunk, torch.split, torch.movedim, torch.swapaxes, torch.swapdims,
          torch.t, torch.adjoint, torch.diagonal, torch.as_strided, torch.unbind}


def written_base(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` writes in place, through views (``x.add_(...)``, ``x += y``, ``x[i] = ...``,
    ``copy_``, ``relu(x, inplace=True)``, ``torch.exp(a, out=x)``), or None where it writes nothing."""
    target = _target(node)
    name = getattr(target, "__name__", target)
    if getattr(target, "__module__", None) in ("operator", "_operator"):
        in_place = target in _IN_PLACE_OPERATORS  # operator.or_ / and_ / not_ are a | b, a & b, not a
    else:
        in_place = isinstance(name, str) and (name == "__setitem__" or name.endswith("_") and not name.endswith("__"))
    written = node.kwargs.get("out") if isinstance(node.kwargs.get("out"), fx.Node) else None
    if written is None and (in_place or node.kwargs.get("inplace") is True) and node.args:
        written = node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None if written is None else view_base(written)


_VIEW_ATTRIBUTES = {("mT",), ("T",), ("mH",), ("H",), ("real",), ("imag",)}  # x.mT, as Dynamo traces it: getattr(x, "mT")
# Ops that return their input itself where they have nothing to change (x.float() of a float tensor)
_MAY_ALIAS = {"contiguous", "to", "type", "type_as", "float", "half", "bfloat16", "double", "detach", "dropout",
              torch.detach, torch.nn.functional.dropout, torch.dropout}


def view_base(node: fx.Node, may_alias: bool = False) -> fx.Node:
    """The tensor ``node`` is a view of, through views (``x.mT``, ``x[:, :4]``), or ``node`` itself;
    with ``may_alias``, also through ops that may return their input (``_MAY_ALIAS``)."""
    through = _VIEWS | _MAY_ALIAS if may_alias else _VIEWS
    while node.args and isinstance(node.args[0], fx.Node) and (
        _target(node) in through or (_target(node) is getattr and node.args[1:2] in _VIEW_ATTRIBUTES)
    ):
        node = node.args[0]
    return node


def mutation_node(node: fx.Node) -> bool:
    """Whether ``node`` updates an input, parameter or buffer (or a view of one) in place. In-place
    updates of intermediates are local."""
    base = written_base(node)
    return base is not None and base.op in ("placeholder", "get_attr")


def mutation(nodes) -> str | None:
    """The first in-place update among ``nodes`` ("name (op)"), or None: skipping nodes that
    update state would lose the update."""
    for node in nodes:
        if mutation_node(node):
            return f"{node.name} ({getattr(_target(node), '__name__', _target(node))})"
    return None


# ---- transformer granularity ----


def _reaches_sin_cos(node: fx.Node) -> bool:
    frontier, seen = [node], {node}
    for _ in range(EMBEDDING_HOPS):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
        if any(_target(u) in _SIN_COS for u in frontier):
            return True
    return False


_KEY = re.compile(r"\['([^']+)'\]")


def input_name(node: fx.Node) -> str:
    """The user's name of a graph input: the innermost named argument it came from (``L['text']``
    -> ``text``, ``L['kwargs']['kv']`` -> ``kv``), else the placeholder's name."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    keys = _KEY.findall(getattr(source, "name", "") or "")
    return keys[-1] if keys else node.name


def match_transformer(gm: fx.GraphModule) -> TransformerSite:
    """The latent and timestep inputs of a graph that is one denoiser call; ``NotSampler`` otherwise."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = [
        (i, n) for i, n in enumerate(inputs)
        if not is_parameter(n) and isinstance(value(n), torch.Tensor) and value(n).dim() <= 1 and value(n).numel() >= 1
    ]
    by_embedding = [(i, n) for i, n in candidates if _reaches_sin_cos(n)]
    by_name = [(i, n) for i, n in candidates if TIMESTEP_NAME.match(input_name(n))]
    per_frame = not (by_embedding or by_name)
    if per_frame:  # diffusion forcing: one timestep per frame, (B, F)
        frame_steps = [
            (i, n) for i, n in enumerate(inputs)
            if not is_parameter(n) and isinstance(value(n), torch.Tensor) and value(n).dim() == 2
        ]
        by_embedding = [(i, n) for i, n in frame_steps if _reaches_sin_cos(n)]
        by_name = [(i, n) for i, n in frame_steps if TIMESTEP_NAME.match(input_name(n))]
    if not (by_embedding or by_name):
        raise NotSampler("no timestep input (shape (), (B,) or per frame (B, F), feeding a sin/cos embedding or named "
                         "like a timestep)", False)
    index, node = (by_embedding or by_name)[0]
    (output_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    outs = output_node.args[0] if isinstance(output_node.args[0], (tuple, list)) else (output_node.args[0],)
    if len(outs) != 1 or not isinstance(outs[0], fx.Node) or not isinstance(value(outs[0]), torch.Tensor):
        raise NotSampler(f"graph returns {len(outs)} values; a cached model call replaces exactly one tensor "
                         "output (graphs cut by a graph break inside the model's forward look like this: the cache "
                         "needs the whole call in one graph)")
    out = value(outs[0])
    latents = [
        i for i, n in enumerate(inputs)
        if not is_parameter(n) and isinstance(value(n), torch.Tensor)
        and value(n).shape == out.shape and value(n).dtype == out.dtype
    ]
    if not latents:
        raise NotSampler(f"no input shaped like the output {tuple(out.shape)} {out.dtype}: not a denoiser call")
    if len(latents) > 1:  # e.g. context frames as many as the chunk's: only a name tells the noisy latent
        named = [i for i in latents if LATENT_NAME.match(input_name(inputs[i]))]
        if len(named) != 1:
            raise NotSampler(f"inputs {[input_name(inputs[i]) for i in latents]} are all shaped like the output "
                             f"{tuple(out.shape)} and {len(named)} of them is named like the noisy latent (x, latents, "
                             "sample, hidden_states, ...): name it so, or put the call behind li_compile.cached(..., "
                             "latent=...)")
        latents = named
    batch = out.shape[0] if out.dim() else 1
    steps = value(node)
    if per_frame and (steps.shape[0] not in (1, batch) or frame_axis(out.shape, steps.shape[1]) is None):
        raise NotSampler(f"per-frame timesteps {input_name(node)} {tuple(steps.shape)}: the latent {tuple(out.shape)} "
                         f"needs a batch of {steps.shape[0]} (or 1) and exactly one axis of {steps.shape[1]} frames")
    if not per_frame and steps.numel() not in (1, batch):
        raise NotSampler(f"timestep input {input_name(node)} has {steps.numel()} values for a batch of {batch}")
    reason = mutation(gm.graph.nodes)
    if reason is not None:
        raise NotSampler(f"the model call updates state in place at {reason}; skipping it on a cache hit would lose that")
    return TransformerSite(latents[0], index, input_name(node), "sin/cos embedding" if by_embedding else "name",
                           per_frame)


# ---- chunk-function granularity ----


def _update_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(x, v)`` when ``node`` is ``x + c*v``, ``c*v + x`` or ``x - c*v`` with ``c`` scalar-like."""
    target = _target(node)
    if target not in _ADD | _SUB or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    orders = [(a, b)] if target in _SUB else [(a, b), (b, a)]
    for x, scaled in orders:
        if not (isinstance(x, fx.Node) and isinstance(scaled, fx.Node) and _target(scaled) in _MUL):
            continue
        if len(scaled.args) != 2 or scaled.kwargs:
            continue
        for c, v in (scaled.args, scaled.args[::-1]):
            if isinstance(v, fx.Node) and _scalar_like(c) and _same_shape(v, x) and _same_shape(node, x):
                return x, v
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _latent_sources(x: fx.Node, through_views: bool = False) -> set[fx.Node]:
    """Nodes that ``x`` comes from through pointwise, latent-shaped ops (``x`` included); with
    ``through_views``, also through indexing and views of any shape (``noise[0]``)."""
    seen, stack = {x}, [x]
    while stack:
        n = stack.pop()
        view = through_views and _target(n) in _VIEWS
        if _target(n) not in _POINTWISE and not view:
            continue
        for i in n.all_input_nodes:
            if i not in seen and (view or _same_shape(i, x)):
                seen.add(i)
                stack.append(i)
    return seen


def _piece(v: fx.Node) -> list[fx.Node]:
    """``v`` and every node all of whose users are in the piece: what only serves ``v``."""
    piece, feeds_v = {v}, _ancestors(v)
    for node in reversed(list(v.graph.nodes)):
        if node in piece or node not in feeds_v or node.op in ("placeholder", "get_attr"):
            continue
        if all(u in piece for u in node.users):
            piece.add(node)
    return [n for n in v.graph.nodes if n in piece]


def _has_timestep(piece: list[fx.Node], x: fx.Node) -> bool:
    """Whether a model piece sees a timestep: a sin/cos inside it, or a non-parameter input of
    one value (or one per batch row) other than the latent ``x``."""
    inside = set(piece)
    if any(_target(n) in _SIN_COS for n in piece):
        return True
    batch = value(x).shape[0] if value(x).dim() else 1
    return any(
        i is not x and not is_parameter(i) and isinstance(value(i), torch.Tensor) and value(i).numel() in (1, batch)
        for n in piece for i in n.all_input_nodes if i not in inside
    )


def match_steps(gm: fx.GraphModule) -> list[Step]:
    """The chained denoising steps of an unrolled loop, first to last; ``NotSampler`` if none.

    Candidates are the updates ``x ± c*v`` whose ``v`` is computed from ``x`` by a piece that sees a
    timestep. A candidate inside another candidate's model piece (guidance ``u + g * (c - u)``, a
    residual inside the model) is part of that model call, not a step. The rest must chain."""
    candidates = []
    for node in gm.graph.nodes:
        operands = _update_operands(node)
        if operands is None:
            continue
        x, v = operands
        if x in _ancestors(v):
            piece = _piece(v)
            if _has_timestep(piece, x):
                candidates.append(Step(x, v, node, piece))
    inside = {n for c in candidates for n in c.piece}
    steps: list[Step] = []
    for step in candidates:
        if step.update in inside:
            continue
        if steps:
            chained = steps[-1].update in _latent_sources(step.x)
        else:
            chained = any(n.op == "placeholder" for n in _latent_sources(step.x, through_views=True))
        if chained:
            steps.append(step)
    if not steps:
        raise NotSampler("no denoising update x ± c*v with a model output v computed from x", False)
    for step in steps:
        reason = mutation(step.piece)
        if reason is not None:
            raise NotSampler(f"the model call of a step updates state in place at {reason}; skipping it would lose that")
    return steps
