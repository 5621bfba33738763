"""Blocks run on the chunk's rows alone at the steps that reuse the context rows (``context.row_blocks``).

With ``context.reuse_rows`` the context's hidden states are frozen, at every layer, at a chunk's
first computed step (``li_compile.context_rows``): at the steps between, a block's context rows
compute exactly what they computed then. Attention-only reuse still runs the block's row-wise
layers (norms, projections, MLP: about a quarter of HY full's step) on those rows. With
``row_blocks`` each block that ``li_compile.compile_repeated_blocks`` compiled runs at those steps on
the other rows alone:

- its inputs lose the context: a tensor with a dimension of the sequence's length loses the
  context's rows along the first such dimension, else one with a dimension of the frame count loses
  the context's frames along the first such dimension (RoPE tables, per-frame modulation);
- its attention calls get the context's keys, values and key-mask columns, kept at the first
  computed step, put back, and attend dense (``ContextRowReuse.attend``);
- its outputs get a context part back: at the end of a chain of blocks (the last block of a model
  call), the part that call output at the first computed step, which is what the model reads after
  its blocks, so the model's output equals attention-only reuse's; between two blocks, that same
  part of the chain's end (the next block drops it): code between the blocks must not read the
  context's hidden states.

That holds only where the block is row-wise outside attention and those dimensions mean what they
seem. The probe chunk checks it at its first step: each block call runs whole (attention dense,
the context's keys and values kept) and then on the chunk's rows alone; the two must agree on the
chunk's rows within ``RTOL`` of the largest value (read when the chunk ends), and within a model
call each block must take the previous block's hidden states as it returned them (a model call
starts a chain: ``model_call``). A model that fails keeps attention-only reuse, and the chunk
statistics say why. The blocks compile a second time, for the shorter sequence, at warm-up.

A block call whose inputs differ from every checked one in shape, dtype or structure (a capacity
bucket or a full context without its key mask that the probe chunk never saw) is checked the same
way at the first step of a later chunk that computes it, and its verdict is read there, before any
step runs it on the chunk's rows. A call on the chunk's rows alone never runs eagerly: where Dynamo's
``recompile_limit`` would make it (the block's code already has that many graphs), its original
attention would see the chunk's keys alone, so it fails instead and the blocks run whole from then on.

It keeps the context's keys and values per layer from the first computed step to the last: twice
the attention output that attention-only reuse keeps.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map_only

from li_compile.context_rows import ContextRowReuse, RowCut, put_back, without

RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # of the largest value; other dtypes (half, bf16): HALF_RTOL
HALF_RTOL = 3e-2
STANDARD = torch.contiguous_format  # the strides a row-major copy has

Leaf = tuple[int, str, torch.Tensor] | None  # (dim, "rows" or "frames", the context's part) of one output tensor


class RowBlocks:
    """Host state of ``row_blocks`` for one accelerated model (module docstring): whether the probe
    found its blocks fit to run on the chunk's rows alone, and the open chunk's kept output parts."""

    def __init__(self, reuse: ContextRowReuse) -> None:
        self.reuse = reuse
        self.fit: bool | None = None  # None: not checked yet
        self.reason: str | None = None  # why the blocks do not fit
        self._differs: torch.Tensor | None = None  # on the device: a checked call's rows differed
        self._checked = 0
        self._sliced = 0
        self._kept: dict[int, dict[int, list[Leaf]]] = {}  # length -> chain end's call number -> its output parts
        self._previous: torch.Tensor | None = None  # the hidden states the model call's latest block returned
        self._numbers: Counter[int] = Counter()  # block calls per length in the current step
        self._step: int | None = None
        self._checked_inputs: set[tuple] = set()  # signatures (``_signature``) of the block calls checked

    def begin_chunk(self) -> None:
        """A chunk opens: nothing kept, nothing counted."""
        self._differs, self._checked, self._sliced, self._previous, self._step = None, 0, 0, None, None
        self._kept.clear()
        self._numbers.clear()

    def model_call(self) -> None:
        """The model is called: its first block starts a new chain."""
        self._previous = None

    def end_chunk(self) -> dict[str, Any]:
        """The chunk's statistics; after the probe chunk, the verdict of its checks."""
        if self.fit is None and self._checked:
            self._read_differs()
            self.fit = self.reason is None
        elif self.fit is None and self.reuse.verdict is False:
            self.fit, self.reason = False, "the context rows are not reused (context_rows_off says why)"
        elif self.fit is None and self.reuse.configured and not self.reuse.rows:
            self.fit, self.reason = False, ("the layout has no context rows (a KV-cache model's queries are the "
                                            "chunk's only): every block runs whole")
        elif self.fit is None and self.reuse.verdict is True:  # the probe chunk ran no block through RowBlocks
            self.fit, self.reason = False, ("no block ran through li_compile.compile_repeated_blocks, which "
                                            "context.row_blocks needs: the context rows' attention alone is reused")
        self.reuse.keep_kv = self.fit is True
        values: dict[str, Any] = {"row_blocks_calls": self._sliced}
        if self.fit is False:
            values["row_blocks_off"] = self.reason
        self.begin_chunk()
        return values

    def reset(self) -> None:
        """Forget the verdict (a new trajectory probes again)."""
        self.begin_chunk()
        self.fit, self.reason, self.reuse.keep_kv = None, None, False
        self._checked_inputs.clear()

    def run(self, call: Callable[..., Any], warming: bool, args: tuple, kwargs: dict) -> Any:
        """One call of a compiled block, ``call(*args, **kwargs)``: whole, checked, or on the
        chunk's rows alone, as the open chunk's step asks."""
        reuse = self.reuse
        cut = _cut_of((args, kwargs), reuse.cuts)
        if cut is None or torch.is_grad_enabled():
            return call(*args, **kwargs)
        if warming:
            out = call(*args, **kwargs)
            if self.fit is not False:
                try:
                    self._on_rows(call, cut, args, kwargs)  # compiles the block for the shorter sequence
                except Exception as error:  # noqa: BLE001 - a block that cannot run on fewer rows runs whole
                    self._refuse(error)
            return out
        if self.fit is None and reuse.probing():
            return self._check(call, cut, args, kwargs)
        if self.fit and reuse.computing():
            signature = _signature((args, kwargs))
            if signature not in self._checked_inputs:
                return self._check_now(call, cut, args, kwargs, signature)
            number, linked, _ = self._enter(args, kwargs, cut)
            out = call(*args, **kwargs)
            self._keep_end(cut, number, linked, out)
            return out
        if self.fit and reuse.reusing():
            return self._reuse(call, cut, args, kwargs)
        return call(*args, **kwargs)

    def _keep_end(self, cut: RowCut, number: int, linked: bool, out: Any) -> None:
        """At the step that keeps the context: ``out``'s context parts, as the chain's end so far."""
        kept = self._kept.setdefault(cut.length, {})
        if linked:
            kept.pop(number - 1, None)  # not a chain's end
        kept[number] = [context_part(t, cut) for t in _leaves(out)]
        self._previous = _hidden(_leaves(out), cut)

    def _both(self, call: Callable[..., Any], cut: RowCut, args: tuple, kwargs: dict,
              verifying: bool) -> tuple[Any, Any, bool]:
        """The call whole (``verifying``: the probe's dense route, keys and values kept), then on the
        chunk's rows alone with its attention calls under the same numbers: (the whole output, the
        rows' output or None where that call failed, whether both made the same calls and outputs)."""
        reuse = self.reuse
        before = reuse.call_index(cut.length)
        reuse.verifying = verifying
        try:
            out = call(*args, **kwargs)
        finally:
            reuse.verifying = False
        after = reuse.call_index(cut.length)
        reuse.set_call_index(cut.length, before)
        try:
            sliced = self._on_rows(call, cut, args, kwargs, checking=True)
        except Exception as error:  # noqa: BLE001 - a block that cannot run on fewer rows runs whole
            self._refuse(error)
            sliced = None
        calls = reuse.call_index(cut.length)
        reuse.set_call_index(cut.length, after)
        alike = sliced is not None and calls == after and len(_leaves(out)) == len(_leaves(sliced))
        if sliced is not None and not alike:
            self.reason = self.reason or "a block on the chunk's rows alone made other calls or outputs than the whole block"
        return out, sliced, alike

    def _compare_all(self, cut: RowCut, out: Any, sliced: Any) -> None:
        """Or into the device flag whether any output of the rows' call differs from the whole call's."""
        for full, part in zip(_leaves(out), _leaves(sliced)):
            self._compare(cut_tensor(full, cut), part)

    def _check_now(self, call: Callable[..., Any], cut: RowCut, args: tuple, kwargs: dict, signature: tuple) -> Any:
        """A block call that no check has seen, at a chunk's first computed step after the probe:
        whole (its context's keys and values kept, as at every such step), then on the chunk's rows
        alone, compared at once (one wait on the device); a failure turns the option off before a
        step runs this call on the chunk's rows. Returns the whole call's output."""
        number, linked, _ = self._enter(args, kwargs, cut)
        out, sliced, alike = self._both(call, cut, args, kwargs, verifying=False)
        if alike:
            self._differs = None
            self._compare_all(cut, out, sliced)
            self._read_differs()
            self._differs = None
        if self.reason is not None:
            self.fit = False  # this chunk's later steps run every block whole, exactly (no kept outputs)
            return out
        self._checked_inputs.add(signature)
        self._keep_end(cut, number, linked, out)
        return out

    def _check(self, call: Callable[..., Any], cut: RowCut, args: tuple, kwargs: dict) -> Any:
        """The probe's check of one block call: whole, then on the chunk's rows alone (module docstring)."""
        out, sliced, alike = self._both(call, cut, args, kwargs, verifying=True)
        if sliced is None:
            return out
        self._checked += 1
        self._checked_inputs.add(_signature((args, kwargs)))
        _, _, broken = self._enter(args, kwargs, cut)
        self._previous = _hidden(_leaves(out), cut)
        if alike and broken:
            self.reason = self.reason or ("the model changes the hidden states between its blocks, so a block's "
                                          "context rows would not be the previous block's")
        elif alike:
            self._compare_all(cut, out, sliced)
        return out

    def _reuse(self, call: Callable[..., Any], cut: RowCut, args: tuple, kwargs: dict) -> Any:
        """A block call at a reused step: on the chunk's rows alone, the kept context parts put back."""
        number, _, broken = self._enter(args, kwargs, cut)
        if broken:
            self.reuse.lose("the model changed the hidden states between two blocks running on the chunk's rows")
        ends = self._kept.get(cut.length, {})
        end = min((n for n in ends if n >= number), default=None)  # this call's chain's end
        kept = [] if end is None else ends[end]
        try:
            sliced = self._on_rows(call, cut, args, kwargs)
        except Exception as error:
            if "recompile_limit" not in f"{type(error).__name__} {error}":
                raise
            self._refuse(error)  # (a graph no check compiled: inputs ``_signature`` does not tell apart)
            raise RuntimeError(f"context.row_blocks: {self.reason}. This step runs the blocks on the chunk's rows "
                               "alone and cannot finish") from error
        leaves = iter(range(len(_leaves(sliced))))

        def restore(part: torch.Tensor) -> torch.Tensor:
            index = next(leaves)
            leaf = kept[index] if index < len(kept) else None
            if leaf is None:
                return part
            dim, kind, context = leaf
            at = cut.start if kind == "rows" else 0
            if part.dim() <= dim or part.shape[:dim] != context.shape[:dim]:
                self.reuse.lose("a block's output on the chunk's rows alone does not match the kept context part")
                return part
            return put_back(part, dim, at, context)

        out = tree_map_only(torch.Tensor, restore, sliced)
        self._previous = _hidden(_leaves(out), cut)
        self._sliced += 1
        return out

    def _on_rows(self, call: Callable[..., Any], cut: RowCut, args: tuple, kwargs: dict,
                 checking: bool = False) -> Any:
        """``call`` on the chunk's rows alone: every input without the context's rows or frames.
        ``checking``: the output is only compared with the whole call's."""
        sliced_args, sliced_kwargs = tree_map_only(torch.Tensor, lambda t: cut_tensor(t, cut), (args, kwargs))
        self.reuse.slicing, self.reuse.checking = cut, checking
        try:  # never eagerly (see the module docstring): past the recompile limit, fail
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return call(*sliced_args, **sliced_kwargs)
        finally:
            self.reuse.slicing, self.reuse.checking = None, False

    def _enter(self, args: tuple, kwargs: dict, cut: RowCut) -> tuple[int, bool, bool]:
        """Count a block call: (its number among the current step's calls at this length, whether it
        takes the hidden states the model call's previous block returned, whether it takes other
        ones: something changed them between two blocks)."""
        step = self.reuse.current_step()
        if self._step != step:
            self._step, self._previous = step, None
            self._numbers.clear()
        number = self._numbers[cut.length]
        self._numbers[cut.length] += 1
        hidden = _hidden(_leaves((args, kwargs)), cut)
        linked = self._previous is not None and hidden is self._previous
        return number, linked, self._previous is not None and not linked

    def _compare(self, whole: torch.Tensor, rows: torch.Tensor) -> None:
        """Or into the device flag whether ``rows`` differs from ``whole`` (both the chunk's rows)."""
        if whole.shape != rows.shape or whole.dtype != rows.dtype:
            self.reason = self.reason or "a block on the chunk's rows alone returned other shapes than the whole block"
            return
        if whole.is_floating_point():
            a, b = whole.float(), rows.float()
            tolerance = RTOL.get(whole.dtype, HALF_RTOL) * a.abs().max().clamp_min(1e-30)
            differs = ((a - b).abs().max() > tolerance) | ~torch.isfinite(b).all()
        else:
            differs = (whole != rows).any()
        self._differs = differs if self._differs is None else self._differs | differs

    def _read_differs(self) -> None:
        """Wait on the device flag of the comparisons so far; the reason where one differed."""
        if self.reason is None and self._differs is not None and bool(self._differs):
            self.reason = "a block on the chunk's rows alone computed other values than the whole block"

    def _refuse(self, error: Exception) -> None:
        self.fit = False
        if "recompile_limit" in f"{type(error).__name__} {error}":
            limit = torch._dynamo.config.recompile_limit
            self.reason = (f"the block's code reached Dynamo's recompile_limit ({limit} graphs) before its call on "
                           "the chunk's rows alone compiled: raise torch._dynamo.config.recompile_limit (each "
                           "capacity bucket and key-mask variant is a graph, and the chunk's rows two more)")
        else:
            self.reason = f"the block failed on the chunk's rows alone ({type(error).__name__}: {str(error)[:200]})"


def _signature(value: Any) -> tuple:
    """What a compiled block's graph is chosen by, roughly: the structure of ``value`` with each
    tensor's shape, strides, dtype, device and whether it requires grad (what Dynamo guards on), and
    each other leaf's type and (plain scalars) value."""
    leaves, structure = tree_flatten(value)

    def leaf(v: Any) -> tuple:
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad)
        return (type(v).__name__, v if v is None or isinstance(v, (bool, int, float, str)) else None)

    return (str(structure), *map(leaf, leaves))


def _cut_of(value: Any, cuts: dict[int, RowCut]) -> RowCut | None:
    """The cut of the first tensor in ``value`` with a dimension of a full-sequence length, or None."""
    for t in _leaves(value):
        for size in t.shape:
            if size in cuts:
                return cuts[size]
    return None


def _dim_of(t: torch.Tensor, cut: RowCut) -> tuple[int, str] | None:
    """Where ``t`` holds the context: its first dimension of the sequence's length (``"rows"``), else
    its first of the frame count (``"frames"``), else None."""
    for kind, size in (("rows", cut.length), ("frames", cut.frames)):
        if size in t.shape:
            return t.shape.index(size), kind
    return None


def cut_tensor(t: torch.Tensor, cut: RowCut) -> torch.Tensor:
    """``t`` without the context's rows or frames (``_dim_of``), a copy with standard strides (a
    compiled block is specialised on its inputs' strides, which a view would take from each
    capacity's full tensor, size-1 dimensions included); unchanged where it holds none."""
    found = _dim_of(t, cut)
    if found is None:
        return t
    dim, kind = found
    start, stop = (cut.start, cut.stop) if kind == "rows" else (0, cut.context_frames)
    rest = without(t, dim, start, stop)
    return rest.clone(memory_format=STANDARD) if start == 0 else rest  # (else already a copy)


def context_part(t: torch.Tensor, cut: RowCut) -> Leaf:
    """A copy of the context's rows or frames of one output tensor, with where they go."""
    found = _dim_of(t, cut)
    if found is None:
        return None
    dim, kind = found
    start, size = (cut.start, cut.stop - cut.start) if kind == "rows" else (0, cut.context_frames)
    return dim, kind, t.narrow(dim, start, size).clone()


def _hidden(tensors: list[torch.Tensor], cut: RowCut) -> torch.Tensor | None:
    """The first of ``tensors`` with a dimension of the sequence's length or of the rows without the
    context's (the hidden states a block passes on), or None."""
    return next((t for t in tensors if cut.length in t.shape or cut.sliced_length in t.shape), None)


def _leaves(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value`` (any pytree: tuples, lists, dicts, registered output classes), in
    the order ``tree_map_only`` visits them."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
