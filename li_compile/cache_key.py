"""What a denoising-cache entry is keyed on besides the cameras: the weights and the conditioning.

A stored early-step output may only be served to a call that would have computed the same thing
up to the approximation the cache makes (a nearby camera, a possibly different context). So every
other input must match what produced it:

- **the weights** (``WeightsIdentity``): the parameter and buffer tensors a compiled graph is
  called with, by identity (held weakly: a tensor freed and another allocated at its address is a
  different tensor), by version counter (every in-place update bumps it: ``load_state_dict``,
  ``p.mul_(0.5)``, an optimizer step) and by storage address (``p.data = other``, ``module.to(...)``
  and ``vector_to_parameters`` swap it). Writes through ``p.data`` in place (``p.data.copy_(ema)``)
  move none of these, so once per chunk the token also holds every weight's L2 norm, computed on
  its device in fp32 (one fused reduction per device and one read): a write through ``.data``
  between chunks that changes any weight's norm changes the key. An inference tensor (made under
  ``torch.inference_mode``) has no version counter: an in-place write to it is seen as one through
  ``.data`` is, by its norm. Weights passed as inputs (``torch.func.functional_call``) are other
  tensors, so they key other entries. Graphs of one model at several shapes (capacity buckets) are
  called with the same tensors, so they share entries.
- **the conditioning** (``conditioning_digest``): every other tensor input of the model (text,
  first-frame, any input the user did not declare as pose- or context-derived), reduced on its
  device to two 64-bit sums of its bytes under fixed position weights. Equal inputs always give
  equal digests; different ones collide with probability about 2**-62 per pair. Each tensor is
  digested once per chunk (``DigestMemo``: within a chunk, a tensor at the same version and address
  reuses its digest), all of a call's in one read. Tensors inside lists, tuples, sets, dicts,
  dataclasses and other objects' attributes are digested as tensors (``leaves``); numpy arrays by
  their bytes; numbers, strings and other plain values by ``repr``.
- **the call's Python values** (``argument_values``): a float, int, bool or string argument is a
  constant Dynamo bakes into the graph, not a graph input, so the graph-level runners add the
  user's call's arguments (but the latent, the timestep and the revisit inputs) to the key. A
  value the model reads from a module attribute or a global is not seen (``li.reset()`` after
  changing one): which of a model's graphs may share entries (its capacity buckets, a full context
  without its mask) cannot be told from which were compiled for a changed value.

What no key sees: a write through ``.data`` (or to an inference tensor) that keeps every weight's
norm (a permutation, a sign flip), and any such write in the middle of a chunk. After such a write call
``li.reset()`` (``Accelerator.reset``), which forgets every cached output.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import types
import weakref
from typing import Collection, Mapping, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

_MIX_A, _MIX_B = 0x1E3779B97F4A7C15, 0x42B2AE3D27D4EB4F  # odd constants below 2**63 (products wrap)


NO_VERSION = -1  # the version of an inference tensor, which has no counter (its norm still keys it)


def _version(t: torch.Tensor) -> int:
    """The tensor's version counter; ``NO_VERSION`` for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return NO_VERSION


def _address(t: torch.Tensor) -> int:
    """Where ``t``'s storage is (a sparse tensor, which has none: 0; its version and values key it)."""
    return t.data_ptr() if t.layout == torch.strided else 0


class WeightsIdentity:
    """Tokens that name a set of weights' contents (module docstring).

    ``token(tensors, epoch)``: one ``(incarnation, version, address)`` triple per tensor, then the
    tensors' L2 norms (``weight_norms``, computed once per ``epoch``: the chunk). The incarnation
    names the tensor object (a new object, even at a freed one's address, gets a new number), the
    version counter moves on every in-place update and never goes back, the address moves when the
    storage is swapped. Equal tokens: the same tensors, unchanged since as far as the module
    docstring says.

    ``prefetch(epoch)`` starts the norms of the tensors keyed last on their device without reading
    them, so that a chunk's first key finds them computed (the host plans the chunk meanwhile)."""

    def __init__(self) -> None:
        self._incarnations: dict[int, tuple[weakref.ref, int]] = {}
        self._next = 0
        self._norms: dict[tuple, tuple] = {}  # triples -> norms, for the epoch in _epoch
        self._epoch: int | None = None
        self._last: list[weakref.ref] = []  # the tensors whose norms were read last
        self._pending: tuple | None = None  # (epoch, triples, norms on their devices) from prefetch

    def token(self, tensors: Sequence[torch.Tensor], epoch: int = 0) -> tuple:
        triples = self._triples(tensors)
        if epoch != self._epoch:
            self._norms, self._epoch = {}, epoch
        if triples not in self._norms:
            pending, self._pending = self._pending, None
            started = pending[2] if pending is not None and pending[:2] == (epoch, triples) else norms_on_device(tensors)
            self._norms[triples] = read_norms(started, len(tensors))
            self._last = [weakref.ref(t) for t in tensors]
        return triples + (self._norms[triples],)

    def prefetch(self, epoch: int) -> None:
        """Start, for ``epoch``, the norms of the tensors whose norms were read last (if all are alive)."""
        tensors = [ref() for ref in self._last]
        if not tensors or any(t is None for t in tensors):
            return
        self._pending = (epoch, self._triples(tensors), norms_on_device(tensors))

    def _triples(self, tensors: Sequence[torch.Tensor]) -> tuple:
        out = []
        for t in tensors:
            known = self._incarnations.get(id(t))
            if known is None or known[0]() is not t:
                self._next += 1
                known = (weakref.ref(t, self._forget(id(t))), self._next)
                self._incarnations[id(t)] = known
            out.append((known[1], _version(t), _address(t)))
        return tuple(out)

    def _forget(self, address: int):
        def forget(ref: weakref.ref) -> None:
            known = self._incarnations.get(address)
            if known is not None and known[0] is ref:
                del self._incarnations[address]
        return forget


def weight_norms(tensors: Sequence[torch.Tensor]) -> tuple:
    """Every tensor's L2 norm in fp32 (fp64 tensors in fp64) or, for integer, bool and complex
    tensors, its byte sums (``digest_sums``): one value tuple per tensor, in order, read to the host
    in one read per group (``norms_on_device``, then ``read_norms``)."""
    return read_norms(norms_on_device(tensors), len(tensors))


def norms_on_device(tensors: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """``weight_norms``' values, not read: per group of tensors (device, and floating or not) their
    indices and a stacked ``(n, 1)`` float (``torch._foreach_norm``, one fused reduction) or ``(n, 2)``
    int64 tensor on that device."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        kind = (torch.float64 if t.dtype == torch.float64 else torch.float32) if t.is_floating_point() else None
        groups.setdefault((t.device, kind), []).append(i)
    parts = []
    with torch.no_grad():
        for (_, kind), indices in groups.items():
            if kind is None:
                stacked = torch.stack([digest_sums(tensors[i]) for i in indices])
            else:
                stacked = torch.stack(torch._foreach_norm([tensors[i] for i in indices], 2, dtype=kind))[:, None]
            parts.append((indices, stacked))
    return parts


def read_norms(parts: list[tuple[list[int], torch.Tensor]], count: int) -> tuple:
    """The values of ``norms_on_device``'s ``parts`` for ``count`` tensors, as host tuples in order."""
    values: list = [None] * count
    for indices, stacked in parts:
        for i, row in zip(indices, stacked.tolist()):
            values[i] = tuple(row)
    return tuple(values)


def digest_sums(t: torch.Tensor) -> torch.Tensor:
    """Two 64-bit position-weighted sums of ``t``'s bytes (a sparse tensor's dense values), on its
    device: ``(2,)`` int64."""
    t = t.detach() if t.layout == torch.strided else t.detach().to_dense()
    flat = t.contiguous().reshape(-1)
    words = flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 and flat.numel() else flat.view(torch.uint8)
    words = words.to(torch.int64)
    position = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64)
    return torch.stack([(words * (position * _MIX_A + 1)).sum(), (words * (position * _MIX_B + 7)).sum()])


class DigestMemo:
    """Digests of tensors (shape, dtype, ``digest_sums``), remembered per tensor object, version and
    address within one ``epoch`` (the chunk; held weakly): every tensor is read again each epoch."""

    def __init__(self) -> None:
        self._memo = WeakIdKeyDictionary()  # tensor -> ((epoch, version, address), digest)

    def digests(self, tensors: Sequence[torch.Tensor], epoch: int = 0) -> list[tuple]:
        """The digest of each of ``tensors``: those not remembered for this epoch in one read."""
        marks = [(epoch, _version(t), _address(t)) for t in tensors]
        fresh = [i for i, (t, mark) in enumerate(zip(tensors, marks))
                 if mark[1] == NO_VERSION or t not in self._memo or self._memo[t][0] != mark]
        by_device: dict[torch.device, list[int]] = {}
        for i in fresh:
            by_device.setdefault(tensors[i].device, []).append(i)
        for indices in by_device.values():  # one read per device
            for i, sums in zip(indices, torch.stack([digest_sums(tensors[i]) for i in indices]).tolist()):
                self._memo[tensors[i]] = (marks[i], (tuple(tensors[i].shape), tensors[i].dtype, *sums))
        return [self._memo[t][1] for t in tensors]


def conditioning_digest(memo: DigestMemo, inputs: Sequence[object], epoch: int = 0) -> tuple:
    """The digest of ``inputs``: of every tensor in them, also inside lists, tuples, dicts and
    dataclasses (``leaves``), in order, with their nesting; tensors not digested yet in this
    ``epoch`` are read at once."""
    items = leaves(inputs)
    tensors = [x for x in items if isinstance(x, torch.Tensor)]
    digests = iter(memo.digests(tensors, epoch))
    return tuple(next(digests) if isinstance(x, torch.Tensor) else x for x in items)


MAX_NESTING = 64  # how deep ``leaves`` follows containers and objects


def leaves(value: object, depth: int = 0, path: tuple[int, ...] = ()) -> list:
    """``value`` flattened for a digest: its tensors as they are, every other leaf as a hashable
    description (numpy arrays by their bytes' hash; numbers, strings, None and other plain values by
    type and ``repr``), with markers for where each list, tuple, set, dict, dataclass or object opens
    and closes. Objects (callable ones too) by their attributes (``__dict__`` and ``__slots__``),
    functions by their code, defaults and closure, a reference back to an enclosing object by how
    far up it is. ``ValueError`` past ``MAX_NESTING`` levels."""
    if isinstance(value, torch.Tensor):
        return [value]
    if id(value) in path:
        return [("cycle", len(path) - path.index(id(value)))]
    if depth > MAX_NESTING:
        raise ValueError(f"a model argument nests containers or objects more than {MAX_NESTING} levels deep: the "
                         "denoising cache cannot key it; pass it flatter, or turn the cache off")
    if isinstance(value, (int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum, type)):
        return [("value", type(value).__qualname__, repr(value))]
    if type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        return [("numpy", str(getattr(value, "dtype", "")), tuple(getattr(value, "shape", ())),
                 hashlib.sha256(value.tobytes()).hexdigest())]
    if isinstance(value, (list, tuple)):
        items = [(None, item) for item in value]
    elif isinstance(value, (set, frozenset)):
        items = [(None, item) for item in sorted(value, key=repr)]
    elif isinstance(value, dict):
        items = [(repr(key), item) for key, item in value.items()]
    elif dataclasses.is_dataclass(value):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, types.FunctionType):
        cells = [cell.cell_contents for cell in value.__closure__ or () if cell.cell_contents is not value]
        code = hashlib.sha256(value.__code__.co_code).hexdigest()[:16]
        items = [("code", f"{value.__module__}.{value.__qualname__}#{code}"), ("defaults", value.__defaults__),
                 ("closure", cells)]
    elif isinstance(value, types.MethodType):
        items = [("function", value.__func__), ("self", value.__self__)]
    elif isinstance(value, functools.partial):
        items = [("function", value.func), ("args", value.args), ("keywords", value.keywords)]
    else:
        slots = [n for cls in type(value).__mro__ for n in getattr(cls, "__slots__", ()) if hasattr(value, n)]
        attributes = {**{n: getattr(value, n) for n in slots}, **getattr(value, "__dict__", {})}
        if not attributes:
            return [("value", type(value).__qualname__, repr(value))]
        items = list(attributes.items())
    inner = [x for label, item in items
             for x in [*([("key", label)] if label is not None else []), *leaves(item, depth + 1, (*path, id(value)))]]
    return [("open", type(value).__qualname__), *inner, ("close",)]


def check_revisit_inputs(names: Collection[str], signature: inspect.Signature, callee: str,
                         arguments: Mapping[str, object] | None = None) -> None:
    """Raise ``ValueError`` naming the ``revisit_inputs`` ``names`` that are no parameter of
    ``signature`` (the compiled call's, ``callee`` in the message): a misspelt name would leave the
    input in the key, and revisits would never hit. Nothing is checked for a signature with
    ``*args`` or ``**kwargs`` (a wrapper), which may take any name, nor where the call's
    ``arguments`` hold a dict (a compiled graph names a tensor inside one by its key, and another
    call may pass other keys: guidance's unconditional dict)."""
    parameters = signature.parameters.values()
    if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in parameters):
        return
    if arguments is not None and _holds_mapping(list(arguments.values())):
        return
    unknown = sorted(set(names) - {p.name for p in parameters})
    if unknown:
        raise ValueError(f"revisit_inputs names {unknown}, which {'is' if len(unknown) == 1 else 'are'} no parameter "
                         f"of {callee}{signature}: give the names the call's parameters have")


def _holds_mapping(values: list, depth: int = 0) -> bool:
    """Whether a dict is among ``values``, or inside their lists and tuples."""
    return depth < MAX_NESTING and any(
        isinstance(v, Mapping) or (isinstance(v, (list, tuple)) and _holds_mapping(list(v), depth + 1)) for v in values)


def named_arguments(bound: inspect.BoundArguments) -> dict[str, object]:
    """A bound call's arguments by name: a ``**kwargs`` parameter's by their own names
    (``"kwargs['x']"`` where a parameter is named ``x``), a ``*args`` parameter's as ``"args[0]"``, ...
    (so that a revisit input passed by keyword through a ``forward(*args, **kwargs)`` wrapper is
    found by its name)."""
    arguments: dict[str, object] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:  # by their own names, unless a parameter has that name
            arguments.update({key if key not in bound.arguments else f"{name}[{key!r}]": item
                              for key, item in value.items()})
        elif kind is inspect.Parameter.VAR_POSITIONAL:  # by position: never one name for them all
            arguments.update({f"{name}[{i}]": item for i, item in enumerate(value)})
        else:
            arguments[name] = value
    return arguments


def argument_values(arguments: Mapping[str, object], excluded: Collection[str]) -> tuple:
    """The Python values of a call's ``arguments`` (by name) but the ``excluded`` names: every leaf
    of each (``leaves``), tensors only marked (they are graph inputs, keyed apart or excluded)."""
    values = []
    for name, value in arguments.items():
        if name not in excluded:
            values.append(("argument", name))
            values.extend("tensor" if isinstance(x, torch.Tensor) else x for x in leaves(value))
    return tuple(values)
