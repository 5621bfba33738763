"""What a denoising-cache entry is keyed on besides the cameras: the weights and the conditioning.

A stored early-step output may only be served to a call that would have computed the same thing
up to the approximation the cache makes (a nearby camera, a possibly different context). So every
other input must match what produced it:

- **the weights** (``WeightsIdentity``): the parameter and buffer tensors a compiled graph is
  called with, by identity (held weakly: a tensor freed and another allocated at its address is a
  different tensor) and by version counter (every in-place update bumps it: ``load_state_dict``,
  ``p.mul_(0.5)``, an optimizer step). Weights passed as inputs (``torch.func.functional_call``)
  are other tensors, so they key other entries. Graphs of one model at several shapes (capacity
  buckets) are called with the same tensors, so they share entries.
- **the conditioning** (``conditioning_digest``): every other tensor input of the model (text,
  first-frame, any input the user did not declare as pose- or context-derived), reduced on its
  device to two 64-bit sums of its bytes under fixed position weights. Equal inputs always give
  equal digests; different ones collide with probability about 2**-62 per pair. A tensor seen
  before at the same version reuses its digest (``DigestMemo``), so a text embedding shared by
  every chunk is read once.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

_MIX_A, _MIX_B = 0x1E3779B97F4A7C15, 0x42B2AE3D27D4EB4F  # odd constants below 2**63 (products wrap)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter; None for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


class WeightsIdentity:
    """Tokens that name a tensor's exact contents without reading them (module docstring).

    ``token(tensors)`` is one ``(incarnation, version)`` pair per tensor: the incarnation names the
    tensor object (a new object, even at a freed one's address, gets a new number), the version
    counter moves on every in-place update and never goes back. Equal tokens: the same tensors,
    unchanged since. None when a tensor has no version counter (an inference tensor): uncacheable."""

    def __init__(self) -> None:
        self._incarnations: dict[int, tuple[weakref.ref, int]] = {}
        self._next = 0

    def token(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[int, int], ...] | None:
        out = []
        for t in tensors:
            version = _version(t)
            if version is None:
                return None
            known = self._incarnations.get(id(t))
            if known is None or known[0]() is not t:
                self._next += 1
                known = (weakref.ref(t, self._forget(id(t))), self._next)
                self._incarnations[id(t)] = known
            out.append((known[1], version))
        return tuple(out)

    def _forget(self, address: int):
        def forget(ref: weakref.ref) -> None:
            known = self._incarnations.get(address)
            if known is not None and known[0] is ref:
                del self._incarnations[address]
        return forget


def tensor_digest(t: torch.Tensor) -> tuple:
    """Shape, dtype and two 64-bit position-weighted sums of ``t``'s bytes, computed on its device
    (one host read)."""
    flat = t.detach().contiguous().reshape(-1)
    words = flat.view(torch.int32) if flat.numel() * flat.element_size() % 4 == 0 and flat.numel() else flat.view(torch.uint8)
    words = words.to(torch.int64)
    position = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64)
    sums = torch.stack([(words * (position * _MIX_A + 1)).sum(), (words * (position * _MIX_B + 7)).sum()])
    return (tuple(t.shape), t.dtype, *sums.tolist())


class DigestMemo:
    """``tensor_digest`` remembered per tensor object and version (held weakly)."""

    def __init__(self) -> None:
        self._memo = WeakIdKeyDictionary()  # tensor -> (version, digest)

    def digest(self, t: torch.Tensor) -> tuple:
        version = _version(t)
        known = self._memo.get(t)
        if known is not None and version is not None and known[0] == version:
            return known[1]
        digest = tensor_digest(t)
        self._memo[t] = (version, digest)
        return digest


def conditioning_digest(memo: DigestMemo, inputs: Sequence[object]) -> tuple:
    """The digest of every tensor in ``inputs`` (non-tensors by value), in order."""
    return tuple(memo.digest(x) if isinstance(x, torch.Tensor) else ("value", repr(x)) for x in inputs)
