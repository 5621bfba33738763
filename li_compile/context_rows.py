"""Context rows reused between a chunk's denoising steps (``context.reuse_rows``).

In a full-sequence model (HY-WorldPlay: ``SequenceLayout.queries == "all"``) the clean context
frames' tokens pass every block at every step, though only the chunk's rows reach the sampler.
With ``reuse_rows`` on, a chunk's attention calls at that sequence's shape run like this:

- at the chunk's first computed step and at its last step, every query row is computed (the
  site's plan as usual), and the context rows' output is kept per call (the n-th call of the step
  at that shape: one per layer, and per model call where a step calls the model more than once);
- at the steps between, only the other rows (prefix, chunk, suffix) are computed, dense over every
  key (SDPA), and the context rows' output is the kept one.

Every op around attention is row-wise, so a block whose context rows attend as at the kept step
outputs those rows as at that step: the whole model then runs as if the context's hidden states,
and so its keys and values at every layer, were frozen at the first computed step. For a
block-causal model (the context never attends to the chunk) whose context attends to nothing that
depends on the step that is exact: it is what the KV-cache form computes (a timestep token in the
prefix, which the context attends to, makes it an approximation like the bidirectional one). For a bidirectional one it is an approximation whose error the last step, computed
in full, corrects: ``benchmarks/results/context_reuse.md`` measures it on the trained
bidirectional world. What it saves is the attention of the context rows at the steps between
(three quarters of HY full's FLOPs are attention; its context is 20 of 24 frames); the
row-wise layers still run on every row (``context.row_blocks`` skips them too:
``li_compile.row_blocks``, which sets ``slicing`` around a block's call and ``keep_kv``). It costs
one kept output per layer, ``(B, H, context tokens, head dim)``, from the first computed step until
the last; with ``row_blocks`` the context's keys and values per layer instead.

It acts only inside a chunk whose loop tells the steps (``ChunkScope.step``) and whose ``sigmas``
give the step count (the last step must be known), never while calibrating, capturing a CUDA graph
(a replay would not run it) or for a causal site, and not in a chunk where the denoising cache
matched a call (the calls it serves can differ from step to step); everything else runs the site
unchanged.

Before any reuse, the model's first chunk that could reuse is a probe: every row is computed, and
the first call of each step at a shape (the first layer) has its context keys compared with those
of the chunk's first step. Where they differ, the context tokens depend on the step (one timestep
conditioning the whole sequence, as in diffusers' video DiTs), freezing them would be wrong, and
reuse stays off for that model (``reuse_rows="auto"``, the default) or raises (``True``). The same
happens where the probe's steps make different numbers of calls at a shape (guidance on some steps
only): a kept output could not be matched to its call.

A kept output is found by its call's place in the step, so the model's calls at that shape must
repeat in the same order at every step of a chunk (classifier-free guidance on some steps only
breaks that). Each reuse checks it on the device: the context rows' keys, which the reused steps
recompute from frozen hidden states, must equal those of the call that kept the rows: their
projection on a fixed random ±1 vector, summed and summed in absolute value, each within
``FINGERPRINT_RTOL`` of the kept absolute sum. The check is read once, when the chunk ends (no
synchronisation per call), and a mismatch raises there, naming the chunk. The same check catches a
model whose layers change the context rows with the step past the probe's first layer (a timestep
modulating only the MLP): under ``"auto"`` that first mismatch also turns reuse off for the model,
so only the one chunk needs generating again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from li_compile.planned_attention import dense_attention
from li_compile.reporting import ChunkStats
from li_compile.sequence import SequenceLayout

FINGERPRINT_RTOL = 1e-3  # a reused call's key fingerprint may differ from the keeper's by this share
PROBED = "probe chunk: every row computed, the context's keys compared between steps"
STEP_DEPENDENT = ("the context's keys in the first layer differ between denoising steps: the context tokens depend on "
                  "the step (e.g. one timestep for the whole sequence), so their rows cannot be reused")
CALLS_VARY = ("the steps of a chunk make different numbers of attention calls at the video's shape (e.g. guidance on "
              "some steps only), so a kept row cannot be matched to its call")
KEYS_DRIFTED = ("at a step that reused the context rows, the context's keys of a later attention call differed from "
                "those of the step that kept them: a layer applied to the context rows depends on the step (a timestep "
                "modulating some layers only) or the calls did not repeat in the same order")


@dataclass(frozen=True)
class RowCut:
    """The context of one full-sequence video shape: ``length`` rows, the context's ``[start, stop)``
    among them, ``frames`` frames of which the first ``context_frames`` are the context's."""

    length: int
    start: int
    stop: int
    frames: int
    context_frames: int

    @property
    def sliced_length(self) -> int:
        """The rows left without the context's."""
        return self.length - (self.stop - self.start)


def context_rows(sequence: SequenceLayout) -> tuple[int, int] | None:
    """The query rows ``[start, stop)`` of ``sequence``'s context frames, or None where there are none
    to reuse (chunk-only queries, or no context frames)."""
    if sequence.queries != "all" or sequence.context_frames == 0:
        return None
    return sequence.frame_start(0), sequence.frame_start(sequence.context_frames)


class ContextRowReuse:
    """Host state of ``reuse_rows`` for one accelerated model: the rows of each video shape, the open
    chunk's step, its kept outputs and its counts (module docstring)."""

    def __init__(self, matched: Callable[[], bool] = lambda: False, required: bool = False) -> None:
        """``matched()``: whether the denoising cache matched any call of the open chunk;
        ``required``: the user asked for reuse (a failed probe raises), not ``"auto"`` (it turns off)."""
        self.matched, self.required = matched, required
        self.verdict: bool | None = None  # None: not probed yet; False: the context's keys follow the step
        self.rows: dict[tuple[int, int], tuple[int, int]] = {}  # (q_len, kv_len) -> context rows
        self.history: list[ChunkStats] = []
        self._warmed: set[tuple] = set()
        self._open = False
        self._step: int | None = None
        self._last: int | None = None
        # per call: its context rows' output and key fingerprint, or (keep_kv) the context's keys, values and mask columns
        self._kept: dict[tuple[tuple[int, int], int], tuple[Any, Any, Any]] = {}
        self._signs: dict[tuple, torch.Tensor] = {}  # (device, dtype, head dim) -> the fingerprint's vector
        self._mismatch: torch.Tensor | None = None  # on the device: a reused call's keys differed from the keeper's
        self._calls: Counter[tuple[int, int]] = Counter()
        self._counts: Counter[str] = Counter()
        self._chunk = -1
        self._probe_keys: dict[tuple[int, int], torch.Tensor] = {}  # shape -> the probe chunk's first fingerprint
        self._probe_mismatch: torch.Tensor | None = None
        self._probe_calls: list[Counter[tuple[int, int]]] = []  # the probe chunk's calls per shape, per step
        self.off_reason = STEP_DEPENDENT  # why a failed probe turned reuse off
        self.cuts: dict[int, RowCut] = {}  # sequence length -> its context (full-sequence shapes)
        self.configured = False  # set_layouts was given layouts
        self.blocks: Any = None  # li_compile.row_blocks.RowBlocks, where context.row_blocks is on
        self.keep_kv = False  # keep the context's keys and values (for blocks run on the chunk's rows), not outputs
        self.slicing: RowCut | None = None  # set by a block call running on the chunk's rows alone
        self.verifying = False  # set by the block call that the probe checks: keep keys and values, attend dense
        self.checking = False  # set by a checked call on the chunk's rows: compared, not used (nothing kept: no loss)
        self.first_step: int | None = None  # the open chunk's first computed step (its rows kept), once known
        self._lost: str | None = None  # why a call running on the chunk's rows found nothing kept

    def set_layouts(self, sequences: Iterable[SequenceLayout]) -> None:
        """The video layouts the model may run (one per capacity bucket)."""
        sequences = list(sequences)
        self.configured = bool(sequences)
        self.rows = {(s.q_len, s.kv_len): rows for s in sequences if (rows := context_rows(s)) is not None}
        self.cuts = {s.q_len: RowCut(s.q_len, *self.rows[s.q_len, s.kv_len], s.frames, s.context_frames)
                     for s in sequences if (s.q_len, s.kv_len) in self.rows}

    def begin_chunk(self, chunk: int, steps: int | None) -> None:
        """Open ``chunk`` of ``steps`` denoising steps (None: unknown, and nothing is reused)."""
        self._open, self._chunk, self._step = True, chunk, None
        self._last = None if steps is None else steps - 1
        self._kept.clear()
        self._calls.clear()
        self._counts.clear()
        self._mismatch = None
        self._probe_keys.clear()
        self._probe_mismatch = None
        self._probe_calls.clear()
        self.first_step, self._lost = None, None
        if self.blocks is not None:
            self.blocks.begin_chunk()

    def set_step(self, step: int) -> None:
        """Denoising ``step`` of the open chunk starts."""
        if self.verdict is None and self._step is not None:
            self._probe_calls.append(self._calls.copy())
        self._step = step
        self._calls.clear()

    def end_chunk(self, failed: bool = False) -> None:
        """Close the chunk: drop its kept outputs and record its counts in ``history``. Raises
        ``RuntimeError`` when a reused call's keys showed that its rows came from another call, or a
        call on the chunk's rows alone found nothing kept, and ``ValueError`` when reuse was required
        and this probe chunk found the context following the step. A chunk that ``failed`` (raised
        before its end) raises nothing here and, if it was the probe, decides nothing: the next
        chunk probes again."""
        mismatch, chunk, probed, lost = self._mismatch, self._chunk, self._probe_mismatch, self._lost
        if self._open:
            values: dict[str, Any] = {"context_rows_reused": self._counts["reused"],
                                      "context_rows_kept_gb": self._counts["kept_bytes"] / 1e9}
            if not self.configured:
                values["context_rows_off"] = "no layout was configured (accelerator.configure(layout=...))"
            elif not self.rows:
                if self.required:  # ("auto": a KV-cache model already computes its context once; nothing to say)
                    values["context_rows_off"] = ("the layout has no context rows (a KV-cache model's queries are "
                                                  "the chunk's only)")
            elif self._last is None:
                values["context_rows_off"] = "the chunk's sigmas were not given: its last step is unknown"
            elif self._step is None:
                values["context_rows_off"] = "the chunk loop never called chunk.step(i): the steps are unknown"
            elif probed is not None and failed:
                values["context_rows_off"] = "the probe chunk raised before its end: the next chunk probes again"
            elif probed is not None:
                calls = [*self._probe_calls, self._calls]
                self.verdict = not bool(probed) and all(c == calls[0] for c in calls)
                self.off_reason = STEP_DEPENDENT if bool(probed) else CALLS_VARY
                values["context_rows_off"] = PROBED
            elif self.verdict is False:
                values["context_rows_off"] = self.off_reason
            if mismatch is not None and not failed and bool(mismatch) and not self.required:
                self.verdict, self.off_reason = False, KEYS_DRIFTED  # never again for this model
                values["context_rows_off"] = KEYS_DRIFTED
            if self.blocks is not None:
                values.update(self.blocks.end_chunk())
            self.history.append(ChunkStats(self._chunk, values))
        self._open, self._step, self._last, self._mismatch, self._probe_mismatch = False, None, None, None, None
        self.slicing, self.verifying, self.checking, self.first_step, self._lost = None, False, False, None, None
        self._kept.clear()
        self._probe_keys.clear()
        self._probe_calls.clear()
        if failed:
            return
        if mismatch is not None and bool(mismatch):
            after = ("turn context.reuse_rows off for this model" if self.required else
                     "reuse is now off for this model (\"auto\"): generate the chunk again")
            raise RuntimeError(f"context.reuse_rows: in chunk {chunk}, {KEYS_DRIFTED}. That chunk's output is not the "
                               f"frozen-context one; {after}")
        if lost is not None:
            raise RuntimeError(f"context.row_blocks: in chunk {chunk} {lost}. That chunk's output is wrong; turn "
                               "context.row_blocks off for this model")
        if probed is not None and self.verdict is False and self.required:
            raise ValueError(f"context.reuse_rows=True: in chunk {chunk} (its rows all computed) {self.off_reason}; "
                             "set context.reuse_rows to False or \"auto\" for this model")

    def reset(self) -> None:
        """Forget the chunk statistics, any open chunk and the probe's verdict (but not a drift found
        at a reused step, ``KEYS_DRIFTED``: the model's layers, not its chunks, caused it); then raise
        the open chunk's error, if its output is wrong (``end_chunk``)."""
        try:
            self.end_chunk()
        finally:
            self.history.clear()
            if self.off_reason != KEYS_DRIFTED:
                self.verdict = None
            if self.blocks is not None:
                self.blocks.reset()

    def current_step(self) -> int | None:
        """The open chunk's current step (None: not told)."""
        return self._step

    def call_index(self, length: int) -> int:
        """How many attention calls at the full-sequence shape of ``length`` the current step has made."""
        return self._calls[length, length]

    def set_call_index(self, length: int, index: int) -> None:
        """Set that count (a checked block call runs its attention calls twice, under the same numbers)."""
        self._calls[length, length] = index

    def lose(self, reason: str) -> None:
        """Record that the open chunk's output is wrong (``end_chunk`` raises, naming ``reason``)."""
        self._lost = self._lost or reason

    def _in_step(self) -> bool:
        """Whether a step of the open chunk is running where rows may be reused: the step and the
        step count known, no gradient, and no call of the chunk matched by the denoising cache."""
        return (self._open and self._step is not None and self._last is not None and not torch.is_grad_enabled()
                and not self.matched())

    def reusing(self) -> bool:
        """Whether the open chunk's current step reuses the context rows kept at an earlier step."""
        return (self.verdict is True and self._in_step() and self._step != self._last
                and self.first_step is not None and self._step != self.first_step)

    def computing(self) -> bool:
        """Whether the open chunk's current step is the one that computes and keeps the context rows."""
        return (self.verdict is True and self._in_step() and self._step != self._last
                and self.first_step in (None, self._step))

    def probing(self) -> bool:
        """Whether the open chunk is the probe and its current step the first it computes."""
        return self.verdict is None and self._in_step() and self.first_step in (None, self._step)

    def applies(self, q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> bool:
        """Whether a call of this shape, inside the open chunk, is run by ``attend``."""
        if self.slicing is not None and not is_causal and q.shape[2] == self.slicing.sliced_length:
            return True
        return (self.verdict is not False and not is_causal and (q.shape[2], k.shape[2]) in self.rows
                and self._in_step())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | None, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Attention ``(B, H, Lq, Dv)`` of one call (``q (B, H, Lq, D)``, ``k``/``v (B, Hkv, Lk, D)``,
        mask broadcastable to ``(B, H, Lq, Lk)``): ``compute()`` (the site's own route) for every row,
        keeping the context rows, or the kept context rows and the others computed dense; inside a
        block running on the chunk's rows alone (``slicing``), the chunk's rows against the kept
        context keys and values."""
        if self.slicing is not None and q.shape[2] == self.slicing.sliced_length:
            return self._attend_sliced(q, k, v, attn_mask, scale)
        shape = (q.shape[2], k.shape[2])
        start, stop = self.rows[shape]
        key = (shape, self._calls[shape])
        self._calls[shape] += 1
        if self.verdict is None:
            return self._probe(q, k, v, attn_mask, scale, start, stop, key, compute)
        kept, keys, _ = self._kept.get(key, (None, None, None))
        expected = (*q.shape[:2], stop - start, v.shape[-1])
        if self._step == self._last or kept is None or tuple(kept.shape) != expected or kept.dtype != q.dtype:
            out = compute()
            if self._step == self._last:
                self._kept.pop(key, None)  # no later step reads it
            else:
                self.first_step = self._step if self.first_step is None else self.first_step
                if self.keep_kv:
                    self._kept[key] = None, None, _context_kv(k, v, attn_mask, start, stop)
                else:
                    self._kept[key] = out[:, :, start:stop].clone(), self._fingerprint(k, start, stop), None
                self._counts["kept_bytes"] = max(self._counts["kept_bytes"], self._kept_bytes())
            return out
        self._mismatch = _or_differs(self._mismatch, self._fingerprint(k, start, stop), keys)
        self._counts["reused"] += 1
        return self._with_kept(q, k, v, attn_mask, scale, start, stop, kept)

    def _attend_sliced(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                       scale: float | None) -> torch.Tensor:
        """A call inside a block running on the chunk's rows alone: its rows (``q``, ``k``, ``v`` without
        the context's) against the keys and values with the kept context's put back, dense."""
        cut = self.slicing
        shape = (cut.length, cut.length)
        key = (shape, self._calls[shape])
        self._calls[shape] += 1
        kv = self._kept.get(key, (None, None, None))[2]
        if kv is None or kv[0].shape[:2] != k.shape[:2]:
            if self._open and not self.checking:  # (outside a chunk: the warm-up, which compiles the route)
                self._lost = self._lost or (f"a block call on the chunk's rows alone found no context keys kept for its "
                                            f"attention call {key[1]} at length {cut.length}: the model's calls did "
                                            "not repeat in the same order at every step")
            kv = _context_kv_zeros(k, v, attn_mask, cut)
        context_k, context_v, context_mask = kv
        mask = attn_mask
        if mask is not None and mask.shape[-1] == cut.sliced_length and mask.shape[-1] > 1:
            if context_mask is None:
                if not self.checking:  # (a checked call is only compared with the whole block, which decides)
                    self._lost = self._lost or "a block call on the chunk's rows alone has a key mask its kept call had not"
                context_mask = _context_kv_zeros(k, v, mask, cut)[2]
            mask = put_back(mask, mask.dim() - 1, cut.start, context_mask.expand(*mask.shape[:-1], -1))
        keys, values = put_back(k, 2, cut.start, context_k), put_back(v, 2, cut.start, context_v)
        if self.verdict is not None:  # (in the probe chunk: a checked call, not a reuse)
            self._counts["reused"] += 1
        return dense_attention(q, keys, values, mask, scale, False)

    def _probe(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | None, start: int, stop: int, key: tuple[tuple[int, int], int],
               compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A call of the probe chunk: ``compute()`` for every row; the first call of each step at this
        shape (the first layer, whose keys no attention has touched yet) has its context keys compared
        with those of the chunk's first such call (read when the chunk ends). In the call of a block
        that the probe checks on the chunk's rows alone (``verifying``), the context's keys and values
        are kept and the call attends dense (the reference the rows-alone call is compared with)."""
        shape, index = key
        if index == 0:
            fingerprint = self._fingerprint(k, start, stop)
            first = self._probe_keys.setdefault(shape, fingerprint)
            if first is not fingerprint:
                self._probe_mismatch = _or_differs(self._probe_mismatch, fingerprint, first)
        self.first_step = self._step if self.first_step is None else self.first_step
        if self.verifying:
            self._kept[key] = None, None, _context_kv(k, v, attn_mask, start, stop)
            return dense_attention(q, k, v, attn_mask, scale, False)
        return compute()

    def warm(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
             scale: float | None) -> None:
        """Warm-up only: run the reusing route once per shape and mask form (its result is dropped), so
        that the first chunk builds nothing (SDPA's cuDNN backend builds per shape and mask form)."""
        shape = (q.shape[2], k.shape[2])
        form = (shape, None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)))
        if shape in self.rows and form not in self._warmed:
            self._warmed.add(form)
            start, stop = self.rows[shape]
            kept = q.new_zeros(*q.shape[:2], stop - start, v.shape[-1])
            self._with_kept(q, k, v, attn_mask, scale, start, stop, kept)

    def _fingerprint(self, k: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``(2,)`` float32: the keys ``k (B, Hkv, Lk, D)`` of rows ``[start, stop)`` (the context's:
        with every token a query, keys and queries share the order) projected on a fixed random ±1
        vector, summed and summed in absolute value (no copy of the rows)."""
        signs = self._signs.get((k.device, k.dtype, k.shape[-1]))
        if signs is None:
            g = torch.Generator().manual_seed(0)
            signs = (torch.randint(0, 2, (k.shape[-1],), generator=g) * 2 - 1).to(k.device, k.dtype)
            self._signs[k.device, k.dtype, k.shape[-1]] = signs
        projected = k[:, :, start:stop] @ signs  # (B, Hkv, rows)
        return torch.stack([projected.sum(dtype=torch.float32), projected.abs().sum(dtype=torch.float32)])

    def _kept_bytes(self) -> int:
        tensors = [t for out, _, kv in self._kept.values() for t in (out, *(kv or ())) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def _with_kept(q, k, v, attn_mask, scale, start: int, stop: int, kept: torch.Tensor) -> torch.Tensor:
        """Rows outside ``[start, stop)`` attended dense, the kept rows in between."""
        rows = q.shape[2]
        other = without(q, 2, start, stop)
        mask = attn_mask
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] == rows and rows > 1:
            mask = without(mask, mask.dim() - 2, start, stop)
        out = dense_attention(other, k, v, mask, scale, False)
        return put_back(out, 2, start, kept)


def _or_differs(flag: torch.Tensor | None, fingerprint: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``flag`` (a 0-d bool on the device, or None: nothing yet) or'ed with whether ``fingerprint``
    differs from ``reference`` (both ``_fingerprint``'s ``(2,)``) by more than ``FINGERPRINT_RTOL`` of
    the reference's absolute sum; no synchronisation."""
    differs = ((fingerprint - reference).abs() > FINGERPRINT_RTOL * reference[1]).any()
    return differs if flag is None else flag | differs


def _context_kv(k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, start: int, stop: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Copies of the context's keys and values (rows ``[start, stop)`` of ``k``/``v (B, Hkv, Lk, D)``)
    and of the mask's context key columns (None without a mask, or one broadcast over the keys)."""
    columns = None
    if attn_mask is not None and attn_mask.shape[-1] > 1:
        columns = attn_mask[..., start:stop].clone()
    return k[:, :, start:stop].clone(), v[:, :, start:stop].clone(), columns


def _context_kv_zeros(k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, cut: RowCut
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Zero context keys and values for the sliced ``k``/``v`` of ``cut``, and a mask's context
    columns that let every key through (warm-up, and a call that found nothing kept)."""
    rows = cut.stop - cut.start
    columns = None
    if attn_mask is not None and attn_mask.shape[-1] > 1:
        shape = (*attn_mask.shape[:-1], rows)
        columns = attn_mask.new_ones(shape) if attn_mask.dtype == torch.bool else attn_mask.new_zeros(shape)
    return k.new_zeros(*k.shape[:2], rows, k.shape[3]), v.new_zeros(*v.shape[:2], rows, v.shape[3]), columns


def without(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """``t`` without indices ``[start, stop)`` of ``dim`` (a view where ``start`` is 0, else a copy);
    ``put_back`` inverts it."""
    if start == 0:
        return t.narrow(dim, stop, t.shape[dim] - stop)
    return torch.cat([t.narrow(dim, 0, start), t.narrow(dim, stop, t.shape[dim] - stop)], dim)


def put_back(part: torch.Tensor, dim: int, at: int, context: torch.Tensor) -> torch.Tensor:
    """``part`` (a tensor without the context's rows or frames) with ``context`` inserted along ``dim``
    before index ``at``."""
    if at == 0:
        return torch.cat([context, part], dim)
    return torch.cat([part.narrow(dim, 0, at), context, part.narrow(dim, at, part.shape[dim] - at)], dim)
