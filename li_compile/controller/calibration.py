"""Calibrating tile plans: the smallest plan parameters that keep a target share of attention mass.

A plan is an approximation: the keys it skips take their share of the softmax with them. The share
it keeps, per query, is the *kept mass* ``sum over visited keys of softmax(q k^T * scale)``, 1 for a
dense plan. ``kept_mass`` measures it per head for one layer and one chunk, from q and k (in the
plan's tile order) or from the probabilities themselves.

``calibrate`` takes candidate parameters ordered from the narrowest plan to the widest (each plan a
superset of the one before, as ``widening_ladder`` builds them, so kept mass only grows along the
list), the attention inputs of a few chunks, and a function that makes a chunk's plan for given
parameters; per layer and head it picks the first candidate whose *worst* chunk keeps at least
``target`` (e.g. 0.99). Heads that no candidate serves are global: they stay dense (choice -1).
Deterministic: no sampling, ties go to the narrower candidate. The result is saved and reloaded as
JSON (``Calibration.to_json`` / ``from_json``), and ``table()`` prints the recall per layer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from li_compile.controller.tile_plan import TilePlanParams
from li_compile.options import CONTEXT_QUERY_RULES
from li_compile.kernels.block_layout import BlockLayout

DENSE = -1  # the choice of a head no candidate serves: it stays dense
MARGIN_STEP = 0.1  # widening_ladder widens the visibility margin by this per step
ROWS_PER_PASS = 1024  # kept_mass scores this many queries at once (bounds memory: rows x kv_len floats)


def kept_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: BlockLayout | torch.Tensor,
    scale: float | None = None,
    rows_per_pass: int = ROWS_PER_PASS,
) -> torch.Tensor:
    """Attention mass a plan keeps, per head: ``(H,)`` float64 in [0, 1], mean over batch and queries.

    ``q: (B, H, Lq, D)``, ``k: (B, Hkv, Lk, D)`` (``Hkv`` divides ``H``), both in the plan's token
    order; ``plan``: a ``BlockLayout`` or its token mask ``(B|1, H|1, Lq, Lk)`` bool; ``scale``
    defaults to ``D ** -0.5``. Dense softmax in float64, ``rows_per_pass`` queries at a time."""
    B, H, Lq, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"k must be (B={B}, Hkv dividing {H}, Lk, D={D}), got {tuple(k.shape)}")
    mask = plan.to_dense_mask() if isinstance(plan, BlockLayout) else plan
    if mask.dim() != 4 or tuple(mask.shape[2:]) != (Lq, k.shape[2]):
        raise ValueError(f"plan mask must be (B|1, H|1, {Lq}, {k.shape[2]}), got {tuple(mask.shape)}")
    scale = D**-0.5 if scale is None else scale
    keys = k.double().repeat_interleave(H // k.shape[1], dim=1)
    kept = torch.zeros(H, dtype=torch.float64)
    for start in range(0, Lq, rows_per_pass):
        rows = slice(start, min(start + rows_per_pass, Lq))
        probs = torch.softmax(q[:, :, rows].double() @ keys.transpose(-1, -2) * scale, dim=-1)
        kept += (probs * mask[:, :, rows].to(probs.device)).sum(-1).sum((0, 2)).cpu()
    return kept / (B * Lq)


def kept_mass_from_probs(probs: torch.Tensor, plan: BlockLayout | torch.Tensor) -> torch.Tensor:
    """``kept_mass`` from attention probabilities ``(B, H, Lq, Lk)`` (rows summing to 1): ``(H,)``."""
    mask = plan.to_dense_mask() if isinstance(plan, BlockLayout) else plan
    return (probs.double() * mask.to(probs.device)).sum(-1).mean((0, 2)).cpu()


def widening_ladder(base: TilePlanParams = TilePlanParams(), steps: int = 4) -> tuple[TilePlanParams, ...]:
    """``steps`` parameter sets from ``base`` outwards, each plan a superset of the one before: step
    ``i`` adds ``i`` tiles to the recent radius and ``i * MARGIN_STEP`` to the visibility margin; then,
    when ``base``'s context rows are not dense, the last step with each wider context-row rule
    (``"frame_local"`` -> ``"camera"`` -> ``"dense"``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    ladder = tuple(
        dataclasses.replace(
            base, recent_radius=base.recent_radius + i, visibility_margin=base.visibility_margin + i * MARGIN_STEP
        )
        for i in range(steps)
    )
    # context rows of a full-sequence model widen last, at the widest window: frame-local, camera, dense
    wider = CONTEXT_QUERY_RULES[: CONTEXT_QUERY_RULES.index(base.context_queries)][::-1]
    return ladder + tuple(dataclasses.replace(ladder[-1], context_queries=rule) for rule in wider)


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` chose: ``candidates`` (narrowest first), per layer the worst-chunk kept mass
    of every candidate and head ``kept[layer]: (candidates, H)``, and per layer and head the chosen
    candidate index ``choice[layer][h]`` (``DENSE`` = -1: stays dense)."""

    target: float
    candidates: tuple[TilePlanParams, ...]
    kept: dict[str, torch.Tensor]
    choice: dict[str, list[int]]

    @classmethod
    def choose(cls, target: float, candidates: Sequence[TilePlanParams], kept: Mapping[str, torch.Tensor]) -> "Calibration":
        """Per layer and head, the first (narrowest) candidate whose worst-chunk kept mass ``kept[layer]:
        (candidates, H)`` reaches ``target``; ``DENSE`` where none does."""
        choice = {}
        for layer, mass in kept.items():
            reaches = mass >= target  # (candidates, H)
            first = reaches.float().argmax(0)  # first True (0 when none: fixed below)
            choice[layer] = [int(f) if reaches[:, h].any() else DENSE for h, f in enumerate(first)]
        return cls(target, tuple(candidates), dict(kept), choice)

    def head_params(self) -> tuple[TilePlanParams | None, ...]:
        """One plan per head for every layer (plan slots are shared by the layers of one shape): the
        widest candidate any layer chose for that head, None (dense) where any layer needs dense.
        Each layer then keeps at least its own choice's mass, as wider plans are supersets."""
        heads = {len(c) for c in self.choice.values()}
        if len(heads) != 1:
            raise ValueError(f"layers have different head counts {sorted(heads)}: no shared per-head plan")
        per_head = []
        for h in range(heads.pop()):
            chosen = [c[h] for c in self.choice.values()]
            per_head.append(None if DENSE in chosen else self.candidates[max(chosen)])
        return tuple(per_head)

    def params_for(self, layer: str, head: int) -> TilePlanParams | None:
        """The chosen parameters of one head, or None when it stays dense."""
        index = self.choice[layer][head]
        return None if index == DENSE else self.candidates[index]

    def recall(self, layer: str) -> torch.Tensor:
        """``(H,)`` worst-chunk kept mass at each head's choice (1 for dense heads)."""
        kept = self.kept[layer]
        return torch.tensor([1.0 if c == DENSE else float(kept[c, h]) for h, c in enumerate(self.choice[layer])])

    def table(self) -> str:
        """One line per layer: the recall (min and mean over heads), the chosen candidates, dense heads."""
        lines = [f"target kept mass {self.target}", "layer  recall_min  recall_mean  choices  dense_heads"]
        for layer, choice in self.choice.items():
            recall = self.recall(layer)
            lines.append(
                f"{layer}  {recall.min():.4f}  {recall.mean():.4f}  {choice}  {sum(c == DENSE for c in choice)}"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({
            "target": self.target,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "kept": {layer: kept.tolist() for layer, kept in self.kept.items()},
            "choice": self.choice,
        })

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        data = json.loads(text)
        candidates = tuple(
            TilePlanParams(**{**c, "depth_range": tuple(c["depth_range"])}) for c in data["candidates"]
        )
        kept = {layer: torch.tensor(v, dtype=torch.float64) for layer, v in data["kept"].items()}
        return cls(data["target"], candidates, kept, {layer: list(c) for layer, c in data["choice"].items()})


def calibrate(
    candidates: Sequence[TilePlanParams],
    chunks: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    plan_for: Callable[[int, TilePlanParams], BlockLayout],
    target: float = 0.99,
    scale: float | None = None,
) -> Calibration:
    """Per layer and head, the narrowest candidate keeping ``target`` of the attention mass on every chunk.

    ``candidates``: narrowest plan first (e.g. ``widening_ladder()``); ``chunks[c]``: layer name ->
    ``(q, k)`` of that chunk, shapes as in ``kept_mass``, in tile order; ``plan_for(c, params)``: the
    chunk's plan for those parameters (e.g. ``tile_plan(tiled, roles, ..., params)`` with chunk
    ``c``'s cameras). Layers must be the same in every chunk."""
    if not 0 < target <= 1:
        raise ValueError(f"target kept mass must be in (0, 1], got {target}")
    if not candidates or not chunks:
        raise ValueError(f"need at least one candidate and one chunk, got {len(candidates)} and {len(chunks)}")
    layers = list(chunks[0])
    for c, chunk in enumerate(chunks):
        if list(chunk) != layers:
            raise ValueError(f"chunk {c} has layers {list(chunk)}, chunk 0 has {layers}")
    worst: dict[str, torch.Tensor] = {}
    for i, params in enumerate(candidates):
        for c, chunk in enumerate(chunks):
            mask = plan_for(c, params).to_dense_mask()
            for layer, (q, k) in chunk.items():
                kept = kept_mass(q, k, mask, scale)
                if layer not in worst:
                    worst[layer] = torch.full((len(candidates), kept.numel()), float("inf"), dtype=torch.float64)
                worst[layer][i] = torch.minimum(worst[layer][i], kept)
    return Calibration.choose(target, candidates, worst)
