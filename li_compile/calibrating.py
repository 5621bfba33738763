"""Calibrating one model's tile plans on its own chunks: the attention mass each candidate plan keeps.

``Accelerator.calibrate`` (or ``li_compile.calibrate``) opens a ``CalibrationRun`` around a few
chunks of the user's loop. In those chunks the controller writes, instead of a plan, the block masks
of every candidate (``controller.calibration.widening_ladder``: narrowest first, each a superset of
the one before) and leaves the slots dense, so the chunks compute exactly what dense attention
does. Every rewritten site that has candidates measures, for ``rows`` query rows spread over the
sequence (padding rows left out), the dense attention probabilities and the share of them each
candidate's blocks hold, per head; a layer is one site call within one graph call
(``graph1.attention3``, ``AttentionLayers``). ``finish`` keeps the worst chunk per layer, candidate and head and picks, per
layer and head, the narrowest candidate reaching the target (``Calibration.choose``; global heads
stay dense). The accelerator then writes one plan per head (``Calibration.head_params``).

Cost: per site call ``rows x kv_len`` probabilities per head, in fp32, ``ROWS_PER_PASS`` rows at a
time; nothing is kept between calls but ``(candidates, heads)`` minima.
"""

from __future__ import annotations

from typing import Sequence

import torch

from li_compile.controller.calibration import Calibration, CalibrationSetting, check_target
from li_compile.controller.tile_plan import TilePlanParams, empty_tile_plan, key_keep, write_tile_plan
from li_compile.kernels.block_layout import cdiv
from li_compile.plan import Plan, PlanSlot
from li_compile.tiled_sequence import TiledSequence, permute_mask

DEFAULT_ROWS = 256  # query rows measured per site call
ROWS_PER_PASS = 64  # probabilities of this many rows at once: rows x heads x kv_len floats


class AttentionLayers:
    """A model's attention layers as calibration names them: the ``i``-th call of a rewritten attention
    site (not causal) within one call of graph ``g`` is layer ``"{g}.attention{i}"``. ``shapes[g]``:
    the ``(q_len, kv_len)`` of each layer of ``g``, from its first call."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, int], ...]] = {}
        self._graph, self._calls = "", []

    def begin_graph_call(self, graph: str) -> None:
        """A compiled graph starts: its site calls are its layers, in order."""
        self._graph, self._calls = graph, []

    def call(self, q_len: int, kv_len: int) -> None:
        """A site call of ``q_len`` x ``kv_len`` tokens starts: the graph's next layer (``current``)."""
        self._calls.append((q_len, kv_len))

    def current(self) -> str:
        """The name of the layer whose site call is running (named only where it is needed: every
        site call records its shape, and only a calibration reads names)."""
        return f"{self._graph}.attention{len(self._calls) - 1}"

    def end_graph_call(self) -> None:
        """The graph returned: its layers are known (from its first call)."""
        self.shapes.setdefault(self._graph, tuple(self._calls))

    def layers(self, graph: str, shapes: set[tuple[int, int]]) -> set[str]:
        """The layers of ``graph`` (one it ran) whose ``(q_len, kv_len)`` is in ``shapes``: the video
        layouts, the layers a calibration measures."""
        return {f"{graph}.attention{i}" for i, shape in enumerate(self.shapes[graph]) if shape in shapes}


class CalibrationRun:
    """The kept-mass measurements of one calibration (module docstring).

    ``candidates``: tile-plan parameters, narrowest first; ``target``: the kept mass to reach (e.g.
    0.99); ``rows``: query rows measured per site call."""

    def __init__(self, candidates: Sequence[TilePlanParams], target: float, rows: int = DEFAULT_ROWS) -> None:
        if not candidates:
            raise ValueError("calibration needs at least one candidate TilePlanParams")
        check_target(target)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        self.candidates, self.target, self.rows = tuple(candidates), target, rows
        self.worst: dict[str, torch.Tensor] = {}  # layer -> (candidates, heads) float64
        self.made_for: CalibrationSetting | None = None  # the setting of the chunks measured
        self.chunks = 0
        self._sites: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def write_candidates(self, plan: Plan, tiled: TiledSequence, roles: Sequence[str], context_poses: torch.Tensor,
                         chunk_poses: torch.Tensor, bounds: torch.Tensor, made_for: CalibrationSetting
                         ) -> dict[str, object]:
        """This chunk's candidate block masks for every slot of ``plan`` matching ``tiled.sequence``
        (arguments as ``write_tile_plan``'s; ``made_for``: the controller's setting, recorded in the
        calibration); the slots are cleared: the chunk runs dense. Returns the chunk's plan stats."""
        self.made_for = made_for
        sequence = tiled.sequence
        slots = plan.slots_for(q_len=sequence.q_len, kv_len=sequence.kv_len)
        rows = key_keep(tiled, roles) if sequence.queries == "all" else torch.ones(sequence.q_len, dtype=torch.bool)
        for slot in slots:
            s = slot.signature
            masks = []
            for params in self.candidates:
                layout = empty_tile_plan(tiled, capacity=s.kv_blocks, block_q=s.block_q, block_k=s.block_k)
                write_tile_plan(layout, tiled, roles, context_poses, chunk_poses, bounds, params)
                masks.append(layout.block_mask()[0, 0])
            self._sites[slot.id] = (torch.stack(masks), tiled.query_perm, tiled.key_perm, rows)
            slot.clear()
        self.chunks += 1
        return {"plan": "dense", "plan_kind": "calibrating", "density": 1.0, "slots": [s.id for s in slots]}

    def record(self, layer: str, slot: PlanSlot, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None,
               scale: float | None) -> None:
        """Measure one site call of ``layer`` (``AttentionLayers.current``; shapes as
        ``li::planned_attention``'s) against this chunk's candidates of ``slot``; a slot without
        candidates this chunk (another shape) is skipped."""
        site = self._sites.get(slot.id)
        if site is None:
            return
        masks, query_perm, key_perm, valid = site
        s = slot.signature
        with torch.no_grad():
            kept = self._kept(q, k, attn_mask, scale, masks, query_perm, key_perm, valid, s.block_q, s.block_k)
        worst = self.worst.setdefault(layer, torch.full_like(kept, float("inf")))
        torch.minimum(worst, kept, out=worst)

    def _kept(self, q, k, attn_mask, scale, masks, query_perm, key_perm, valid, block_q, block_k) -> torch.Tensor:
        """(candidates, heads) float64: the mean share of each sampled row's attention on each candidate's blocks."""
        B, H, Lq, D = q.shape
        device = q.device
        positions = torch.nonzero(valid).flatten()  # tile-order rows that hold a real query
        pick = positions[torch.linspace(0, len(positions) - 1, min(self.rows, len(positions))).round().long()]
        keys = k.index_select(2, key_perm.to(device)).float()
        keys = keys.repeat_interleave(H // k.shape[1], dim=1)
        scale = D**-0.5 if scale is None else scale
        pad = cdiv(keys.shape[2], block_k) * block_k - keys.shape[2]
        kept = torch.zeros(len(self.candidates), H, dtype=torch.float64, device=device)
        for start in range(0, len(pick), ROWS_PER_PASS):
            rows = pick[start:start + ROWS_PER_PASS]
            logits = q.index_select(2, query_perm[rows].to(device)).float() @ keys.transpose(-1, -2) * scale
            if attn_mask is not None:
                mask = permute_mask(attn_mask, query_perm[rows].to(device), key_perm.to(device))
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (B, H, r, Lk); a row with no key: 0
            per_block = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (-1, block_k)).sum(-1)  # (B, H, r, K)
            on = masks.to(device)[:, rows // block_q].to(per_block.dtype)  # (C, r, K)
            kept += torch.einsum("bhrk,crk->ch", per_block, on).double()
        return (kept / (B * len(pick))).clamp(0.0, 1.0).cpu()  # (TF32 or fp32 sums may pass 1: a share is at most 1)

    def finish(self) -> Calibration:
        """The calibration of the measured chunks; ValueError when no site was measured."""
        if not self.worst:
            raise ValueError(
                "calibration measured no attention site: run at least one chunk inside it, through the compiled "
                "model (its rewritten attention sites of the configured layout's shapes)"
            )
        return Calibration.choose(self.target, self.candidates, self.worst, self.made_for)

