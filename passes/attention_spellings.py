"""What each torch-level FX node means, for the attention matcher: one table of spellings.

Dynamo hands the backend a graph in which the same operation has many spellings: ``q @ k``,
``torch.matmul(q, k)``, ``q.matmul(k)``, ``torch.bmm``, ``torch.einsum``; ``k.transpose(-2, -1)``,
``k.mT``, ``k.permute(...)``; ``s.float()``, ``s.to(torch.float32)``, ``s.type_as(q)``; ``s * c``,
``s / c``, ``s *= c``; ``s + mask``, ``s.masked_fill(m, -inf)``, ``torch.where(m, s, -inf)``.
``read(node)`` turns a node into the few canonical operations the matcher reasons about:

- ``Contraction``: an einsum (operands, equation), with baddbmm's ``alpha`` and ``beta * input``;
- ``Unary``: a step on one tensor: cast, identity, scale, additive or fill mask, permutation,
  repeat_interleave (GQA);
- ``Softmax`` and ``Sdpa``.

A node can have two readings (``a + b``: either side may be the scores), so ``read`` returns a
tuple; a node it does not know reads as ``()``. A new spelling is one line in ``_FUNCTIONS`` or
``_METHODS`` and, at most, a small reader.
"""

from __future__ import annotations

import math
import operator
import string
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

CAST = "cast"
IDENTITY = "identity"
SCALE = "scale"
ADD_MASK = "add_mask"
KEEP_MASK = "keep_mask"  # arg: a bool mask, True where the score is kept
DROP_MASK = "drop_mask"  # arg: a bool mask, True where the score is set to -inf
FINITE_FILL = "finite_fill"  # masked_fill with a finite value (arg): not exactly attention masking
PERMUTE = "permute"
REPEAT_INTERLEAVE = "repeat_interleave"  # arg: (repeats, dim); changes the shape (GQA head sharing)


@dataclass(frozen=True)
class Contraction:
    """``scale * einsum(equation, *operands) + addend_scale * addend`` (addend: baddbmm's input)."""

    operands: tuple[fx.Node, ...]
    equation: str
    scale: float = 1.0
    addend: fx.Node | None = None
    addend_scale: float = 1.0


@dataclass(frozen=True)
class Unary:
    """A step on one tensor ``x`` (``kind``: one of the constants above).

    ``arg``: the factor (SCALE), the mask node (masks), the fill value (FINITE_FILL), the
    permutation (PERMUTE: output axis ``n`` is input axis ``arg[n]``) or (repeats, dim)
    (REPEAT_INTERLEAVE). ``inplace``: the step overwrites ``x`` (``s *= c``)."""

    kind: str
    x: fx.Node
    arg: Any = None
    inplace: bool = False


@dataclass(frozen=True)
class Softmax:
    """``softmax(x, dim)`` in any spelling (its dtype argument does not change what it computes)."""

    x: fx.Node
    dim: int


@dataclass(frozen=True)
class Sdpa:
    """``F.scaled_dot_product_attention`` with its arguments bound by name."""

    query: Any
    key: Any
    value: Any
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any


Reading = Contraction | Unary | Softmax | Sdpa


def example(value: Any) -> Any:
    """The fake tensor Dynamo recorded for ``value`` (a node), or ``value`` itself (a constant)."""
    if isinstance(value, fx.Node):
        return value.meta.get("example_value")
    return value


def rank(node: Any) -> int | None:
    value = example(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def read(node: fx.Node) -> tuple[Reading, ...]:
    """The canonical readings of ``node`` (empty if it is none of the spellings the matcher knows)."""
    if node.op == "call_function":
        reader = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        reader = _METHODS.get(node.target)
    else:
        reader = None
    if reader is None:
        return ()
    try:
        result = reader(_Args(node))
    except (TypeError, ValueError, IndexError):  # an unusual call form: not a spelling we know
        return ()
    if result is None:
        return ()
    return result if isinstance(result, tuple) else (result,)


_DROPPABLE_KINDS = (CAST, IDENTITY, PERMUTE, REPEAT_INTERLEAVE)
_DROPPABLE_METHODS = frozenset({"reshape", "view", "expand", "unsqueeze", "squeeze", "flatten"})


def is_droppable(node: fx.Node) -> bool:
    """True for side-effect-free views, casts, identities and repeats: safe to erase once unused."""
    if node.op == "call_method" and node.target in _DROPPABLE_METHODS:
        return True
    return any(isinstance(r, Unary) and r.kind in _DROPPABLE_KINDS and not r.inplace for r in read(node))


class _Args:
    """Positional-or-keyword access to a node's arguments; position 0 is the input (``self``)."""

    def __init__(self, node: fx.Node) -> None:
        self.node = node

    def __call__(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    @property
    def rest(self) -> tuple:
        return self.node.args[1:]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, fx.Node) and isinstance(example(value), torch.Tensor)


# ---- contractions --------------------------------------------------------------------------

_BATCH_LETTERS = string.ascii_uppercase


def matmul_equation(rank_a: int, rank_b: int) -> str | None:
    """The einsum equation of ``a @ b`` for operand ranks >= 2 (batch axes broadcast from the right)."""
    if rank_a < 2 or rank_b < 2:
        return None
    batch = _BATCH_LETTERS[: max(rank_a, rank_b) - 2]
    a = batch[len(batch) - (rank_a - 2) :]
    b = batch[len(batch) - (rank_b - 2) :]
    return f"{a}mk,{b}kn->{batch}mn"


def _matmul(a: _Args) -> Contraction | None:
    x, y = a(0, "input"), a(1, "other")
    if not (_is_tensor(x) and _is_tensor(y)):
        return None
    equation = matmul_equation(rank(x), rank(y))
    return None if equation is None else Contraction((x, y), equation)


def _baddbmm(a: _Args) -> Contraction | None:
    addend, x, y = a(0, "input"), a(1, "batch1"), a(2, "batch2")
    beta, alpha = a(3, "beta", 1), a(4, "alpha", 1)
    if not (_is_tensor(x) and _is_tensor(y) and _is_number(beta) and _is_number(alpha)):
        return None
    return Contraction((x, y), matmul_equation(3, 3), float(alpha), addend if beta != 0 else None, float(beta))


def _einsum(a: _Args) -> Contraction | None:
    equation, operands = a(0, "equation"), a.rest
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or not all(_is_tensor(op) for op in operands):
        return None
    return Contraction(tuple(operands), equation)


def parse_equation(equation: str, ranks: list[int]) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
    """Split an einsum equation into per-operand and output label tuples, expanding ``...`` with
    fresh labels (right-aligned, as einsum broadcasts) and filling an implicit output."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"einsum equation {equation!r} has {len(terms)} operands, got {len(ranks)} tensors")
    ellipsis_rank = max((r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t), default=0)
    fresh = tuple(f"...{n}" for n in range(ellipsis_rank))

    def labels(term: str, width: int) -> tuple[str, ...]:
        head, dots, tail = term.partition("...")
        return tuple(head) + (fresh[len(fresh) - width :] if dots else ()) + tuple(tail)

    inputs = [labels(t, r - (len(t) - 3) if "..." in t else 0) for t, r in zip(terms, ranks)]
    if arrow:
        output = labels(rhs, ellipsis_rank)
    else:
        counts = [label for term in inputs for label in term]
        output = fresh + tuple(sorted(x for x in set(counts) if counts.count(x) == 1 and not x.startswith("...")))
    return inputs, output


# ---- shape-preserving steps ----------------------------------------------------------------


def _transpose(a: _Args) -> Unary | None:
    x, d0, d1 = a(0, "input"), a(1, "dim0"), a(2, "dim1")
    r = rank(x)
    if r is None or not isinstance(d0, int) or not isinstance(d1, int):
        return None
    perm = list(range(r))
    perm[d0 % r], perm[d1 % r] = perm[d1 % r], perm[d0 % r]
    return Unary(PERMUTE, x, tuple(perm))


def _permute(a: _Args) -> Unary | None:
    x = a(0, "input")
    if a.node.op == "call_function" or not a.rest:
        dims = a(1, "dims", ())
    else:  # x.permute(0, 2, 1, 3) or x.permute([0, 2, 1, 3])
        dims = a.rest[0] if len(a.rest) == 1 and isinstance(a.rest[0], (list, tuple)) else a.rest
    r = rank(x)
    if r is None or len(dims) != r or not all(isinstance(d, int) for d in dims):
        return None
    return Unary(PERMUTE, x, tuple(d % r for d in dims))


def _getattr(a: _Args) -> Unary | None:
    x, name = a(0), a(1)
    r = rank(x)
    if r is None or r < 2:
        return None
    if name == "mT":
        return Unary(PERMUTE, x, tuple(range(r - 2)) + (r - 1, r - 2))
    if name == "T":
        return Unary(PERMUTE, x, tuple(reversed(range(r))))
    return None


def _t(a: _Args) -> Unary | None:
    x = a(0, "input")
    return Unary(PERMUTE, x, (1, 0)) if rank(x) == 2 else None


def _cast(a: _Args) -> Unary | None:
    """Any dtype conversion that keeps shape and device, to a floating dtype."""
    x, out = a(0, "input"), example(a.node)
    before = example(x)
    if not (isinstance(before, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if out.shape != before.shape or out.device != before.device or not out.dtype.is_floating_point:
        return None
    return Unary(CAST, x)


def _identity(a: _Args) -> Unary | None:
    x = a(0, "input")
    return Unary(IDENTITY, x) if _is_tensor(x) else None


def _clone(a: _Args) -> Unary | None:
    return _identity(a) if a.node.kwargs.get("memory_format") is None else None


def _dropout(a: _Args) -> Unary | None:
    """``F.dropout`` / ``torch.dropout``: the identity when not training or when p == 0."""
    p = a(1, "p", 0.5)
    training = a(2, "training" if a.node.target is torch.nn.functional.dropout else "train", True)
    if training is False or p == 0:
        return _identity(a)
    return None


def _scaled(inplace: bool, divide: bool) -> Callable[[_Args], Unary | None]:
    def reader(a: _Args) -> Unary | None:
        x, y = a(0, "input"), a(1, "other")
        if divide:
            if a.node.kwargs.get("rounding_mode") is not None or not _is_tensor(x) or not _is_number(y) or y == 0:
                return None
            return Unary(SCALE, x, 1.0 / y, inplace)
        if _is_tensor(x) and _is_number(y):
            return Unary(SCALE, x, float(y), inplace)
        if _is_tensor(y) and _is_number(x) and not inplace:
            return Unary(SCALE, y, float(x))
        return None

    return reader


def _added(inplace: bool) -> Callable[[_Args], tuple[Unary, ...] | None]:
    def reader(a: _Args) -> tuple[Unary, ...] | None:
        x, y = a(0, "input"), a(1, "other")
        if a(2, "alpha", 1) != 1 or not (_is_tensor(x) and _is_tensor(y)):
            return None
        if inplace:
            return (Unary(ADD_MASK, x, y, True),)
        return (Unary(ADD_MASK, x, y), Unary(ADD_MASK, y, x))

    return reader


def _is_minus_inf(value: Any) -> bool:
    return isinstance(value, float) and value == -math.inf


def _masked_fill(inplace: bool) -> Callable[[_Args], Unary | None]:
    def reader(a: _Args) -> Unary | None:
        x, mask, value = a(0, "input"), a(1, "mask"), a(2, "value")
        if not (_is_tensor(x) and _is_tensor(mask)):
            return None
        if _is_minus_inf(value):
            return Unary(DROP_MASK, x, mask, inplace)
        return Unary(FINITE_FILL, x, value, inplace) if _is_number(value) else None

    return reader


def _where(a: _Args) -> Unary | None:
    cond, x, y = a(0, "condition"), a(1, "input"), a(2, "other")
    if not _is_tensor(cond):
        return None
    if _is_tensor(x) and _is_minus_inf(y):
        return Unary(KEEP_MASK, x, cond)
    if _is_tensor(y) and _is_minus_inf(x):
        return Unary(DROP_MASK, y, cond)
    return None


def _repeat_interleave(a: _Args) -> Unary | None:
    x, repeats, dim = a(0, "input"), a(1, "repeats"), a(2, "dim")
    if not _is_tensor(x) or not isinstance(repeats, int) or isinstance(repeats, bool) or not isinstance(dim, int):
        return None
    return Unary(REPEAT_INTERLEAVE, x, (repeats, dim % rank(x)))


# ---- softmax and SDPA ----------------------------------------------------------------------


def _softmax(a: _Args) -> Softmax | None:
    x, dim = a(0, "input"), a(1, "dim")
    return Softmax(x, dim) if _is_tensor(x) and isinstance(dim, int) else None


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _sdpa(a: _Args) -> Sdpa:
    return Sdpa(*(a(n, name, default) for n, (name, default) in enumerate(zip(_SDPA_PARAMS, _SDPA_DEFAULTS))))


# ---- the tables ----------------------------------------------------------------------------

_FUNCTIONS: dict[Callable, Callable[[_Args], Any]] = {
    # contractions
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.bmm: _matmul,
    torch.baddbmm: _baddbmm,
    torch.einsum: _einsum,
    # permutations
    torch.transpose: _transpose,
    torch.swapaxes: _transpose,
    torch.swapdims: _transpose,
    torch.permute: _permute,
    getattr: _getattr,
    torch.t: _t,
    # identities
    torch.nn.functional.dropout: _dropout,
    torch.dropout: _dropout,
    torch.clone: _clone,
    torch.repeat_interleave: _repeat_interleave,
    # scales
    operator.mul: _scaled(inplace=False, divide=False),
    torch.mul: _scaled(inplace=False, divide=False),
    operator.imul: _scaled(inplace=True, divide=False),
    operator.truediv: _scaled(inplace=False, divide=True),
    torch.div: _scaled(inplace=False, divide=True),
    operator.itruediv: _scaled(inplace=True, divide=True),
    # masks
    operator.add: _added(inplace=False),
    torch.add: _added(inplace=False),
    operator.iadd: _added(inplace=True),
    torch.masked_fill: _masked_fill(inplace=False),
    torch.where: _where,
    # softmax, SDPA
    torch.softmax: _softmax,
    torch.nn.functional.softmax: _softmax,
    torch.special.softmax: _softmax,
    torch._C._nn.scaled_dot_product_attention: _sdpa,
}

_METHODS: dict[str, Callable[[_Args], Any]] = {
    "matmul": _matmul,
    "bmm": _matmul,
    "baddbmm": _baddbmm,
    "transpose": _transpose,
    "swapaxes": _transpose,
    "swapdims": _transpose,
    "permute": _permute,
    "t": _t,
    "float": _cast,
    "half": _cast,
    "bfloat16": _cast,
    "double": _cast,
    "to": _cast,
    "type": _cast,
    "type_as": _cast,
    "contiguous": _identity,
    "repeat_interleave": _repeat_interleave,
    "clone": _clone,
    "mul": _scaled(inplace=False, divide=False),
    "mul_": _scaled(inplace=True, divide=False),
    "div": _scaled(inplace=False, divide=True),
    "div_": _scaled(inplace=True, divide=True),
    "add": _added(inplace=False),
    "add_": _added(inplace=True),
    "masked_fill": _masked_fill(inplace=False),
    "masked_fill_": _masked_fill(inplace=True),
    "softmax": _softmax,
}
