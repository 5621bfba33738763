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
JSON (``Calibration.to_json`` / ``from_json``, which refuses a file of another format version or
with missing, unknown or inconsistent fields), and ``table()`` prints the recall per layer.

A calibration holds one choice per head, so it fits only a model with that many heads per layer;
one measured on a model (``li_compile.calibrate``) also records the setting it was measured in
(``made_for``: block sizes, tile, depth range, lens), and a model in another setting refuses it
(``ContextController.use_calibration``), as does a model whose graphs have other attention layers
than it measured (``Accelerator.use_calibration``).
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
FORMAT_VERSION = 2  # of Calibration.to_json's files; from_json reads this version only (2: made_for has the lens)
MARGIN_STEP = 0.1  # widening_ladder widens the visibility margin by this per step
ROWS_PER_PASS = 1024  # kept_mass scores this many queries at once (bounds memory: rows x kv_len floats)
MASS_ROUNDING = 1e-4  # a measured kept mass may exceed 1 by this much (fp32 softmax rows summing past 1)


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


def check_target(target: float) -> None:
    """Raise ValueError unless ``target`` (the kept mass a calibration reaches) is a number in (0, 1]."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target kept mass must be in (0, 1], got {target!r}")


@dataclass(frozen=True)
class CalibrationSetting:
    """The setting a calibration was measured in, which a model must share to use it: the attention
    blocks ``block_q`` x ``block_k`` tokens (``sparsity.block_q``/``block_k``), the 3D ``tile`` of one
    block in the tile order (t, h, w), the scene's ``depth_range`` ``(near, far)`` (the
    controller's ``near``/``far``) and the lens ``bounds`` ``(x_min, x_max, y_min, y_max)`` on the
    image plane (the controller's ``bounds``, from ``fov_y_deg`` and ``aspect`` or given)."""

    block_q: int
    block_k: int
    tile: tuple[int, int, int]
    depth_range: tuple[float, float]
    bounds: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        sizes = (self.block_q, self.block_k, *self.tile)
        if len(self.tile) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"block_q, block_k and tile (t, h, w) must be positive ints, got {self.block_q!r}, "
                             f"{self.block_k!r} and {self.tile!r}")
        depths = self.depth_range
        numbers = len(depths) == 2 and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in depths)
        if not numbers or not 0 < depths[0] < depths[1]:
            raise ValueError(f"depth_range must be (near, far) with 0 < near < far, got {depths!r}")
        b = self.bounds
        numbers = len(b) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b)
        if not numbers or not (b[0] < b[1] and b[2] < b[3]):
            raise ValueError(f"bounds must be (x_min, x_max, y_min, y_max) with x_min < x_max and y_min < y_max, "
                             f"got {b!r}")

    def differences(self, other: "CalibrationSetting") -> list[str]:
        """``"name ours vs theirs"`` for every field where ``other`` differs."""
        return [
            f"{f.name} {getattr(self, f.name)} vs {getattr(other, f.name)}"
            for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)
        ]


# the fields of a calibration file (``Calibration.to_json``), of each candidate, and of ``made_for``
_FILE_FIELDS = ("format_version", "target", "candidates", "kept", "choice", "made_for")
_CANDIDATE_FIELDS = tuple(f.name for f in dataclasses.fields(TilePlanParams))
_SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(CalibrationSetting))


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` chose: ``candidates`` (narrowest first), per layer the worst-chunk kept mass
    of every candidate and head ``kept[layer]: (candidates, H)``, and per layer and head the chosen
    candidate index ``choice[layer][h]`` (``DENSE`` = -1: stays dense). ``made_for``: the setting it
    was measured in (None: made from tensors or by hand, not on a model; only its heads are checked).
    Raises ValueError naming the first inconsistent field."""

    target: float
    candidates: tuple[TilePlanParams, ...]
    kept: dict[str, torch.Tensor]
    choice: dict[str, list[int]]
    made_for: CalibrationSetting | None = None

    def __post_init__(self) -> None:
        check_target(self.target)
        if not self.candidates or not all(isinstance(c, TilePlanParams) for c in self.candidates):
            raise ValueError(f"candidates must be a non-empty sequence of TilePlanParams, got {self.candidates!r}")
        if not self.choice or set(self.kept) != set(self.choice):
            raise ValueError(
                f"kept and choice must name the same layers (at least one), got {sorted(self.kept)} and {sorted(self.choice)}"
            )
        if self.made_for is not None and not isinstance(self.made_for, CalibrationSetting):
            raise ValueError(f"made_for must be a CalibrationSetting or None, got {type(self.made_for).__name__}")
        n = len(self.candidates)
        for layer, choice in self.choice.items():
            indices = isinstance(choice, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in choice)
            if not indices or not choice or not all(DENSE <= c < n for c in choice):
                raise ValueError(
                    f"choice[{layer!r}] must list one candidate index in [{DENSE}, {n}) per head "
                    f"({DENSE}: dense), got {choice!r}"
                )
            kept = self.kept[layer]
            if not isinstance(kept, torch.Tensor) or tuple(kept.shape) != (n, len(choice)):
                shape = tuple(kept.shape) if isinstance(kept, torch.Tensor) else type(kept).__name__
                raise ValueError(
                    f"kept[{layer!r}] must be (candidates={n}, heads={len(choice)}) as choice[{layer!r}] has "
                    f"{len(choice)} heads, got {shape}"
                )
            outside = kept.isnan() | (kept < 0) | (kept > 1 + MASS_ROUNDING)
            if outside.any():
                raise ValueError(f"kept[{layer!r}] must hold kept masses in [0, 1], got {float(kept[outside][0])}")
            reaching = _narrowest_reaching(kept, self.target)
            if list(choice) != reaching:
                raise ValueError(
                    f"choice[{layer!r}] is {list(choice)}, but kept[{layer!r}] at target {self.target} gives "
                    f"{reaching} (per head the narrowest candidate reaching it, {DENSE} where none does)"
                )

    @classmethod
    def choose(cls, target: float, candidates: Sequence[TilePlanParams], kept: Mapping[str, torch.Tensor],
               made_for: CalibrationSetting | None = None) -> "Calibration":
        """Per layer and head, the first (narrowest) candidate whose worst-chunk kept mass ``kept[layer]:
        (candidates, H)`` reaches ``target``; ``DENSE`` where none does."""
        choice = {layer: _narrowest_reaching(mass, target) for layer, mass in kept.items()}
        return cls(target, tuple(candidates), dict(kept), choice, made_for)

    @property
    def heads(self) -> int:
        """The head count of every layer (one per-head plan is shared by all); ValueError when they differ."""
        heads = {len(c) for c in self.choice.values()}
        if len(heads) != 1:
            raise ValueError(f"layers have different head counts {sorted(heads)}: no shared per-head plan")
        return heads.pop()

    def head_params(self) -> tuple[TilePlanParams | None, ...]:
        """One plan per head for every layer (plan slots are shared by the layers of one shape): the
        widest candidate any layer chose for that head, None (dense) where any layer needs dense.
        Each layer then keeps at least its own choice's mass, as wider plans are supersets."""
        per_head = []
        for h in range(self.heads):
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
        """This calibration as JSON, with its ``format_version`` (``from_json`` reads it back)."""
        return json.dumps({
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "kept": {layer: kept.tolist() for layer, kept in self.kept.items()},
            "choice": self.choice,
            "made_for": None if self.made_for is None else dataclasses.asdict(self.made_for),
        })

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        """The calibration ``to_json`` wrote. ValueError naming what is wrong for another format
        version, a missing or unknown field, or values that do not fit together (``__post_init__``)."""
        data = json.loads(text)
        if isinstance(data, dict) and "format_version" not in data:
            raise ValueError(
                f"calibration has no format_version: not a calibration, or written before version {FORMAT_VERSION} "
                "of the format; calibrate the model again"
            )
        _check_fields(data, "calibration", _FILE_FIELDS)
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"calibration format_version is {data['format_version']!r}, this li_compile reads version "
                f"{FORMAT_VERSION}: calibrate the model again"
            )
        if not isinstance(data["candidates"], list):
            raise ValueError(f"calibration candidates must be a list, got {type(data['candidates']).__name__}")
        candidates = []
        for i, c in enumerate(data["candidates"]):
            _check_fields(c, f"candidates[{i}]", _CANDIDATE_FIELDS)
            depth_range = _as_tuple(c["depth_range"], f"candidates[{i}].depth_range", 2)
            candidates.append(TilePlanParams(**{**c, "depth_range": depth_range}))
        for name in ("kept", "choice"):
            if not isinstance(data[name], dict):
                raise ValueError(f"calibration {name} must map layer names to lists, got {type(data[name]).__name__}")
        kept = {}
        for layer, v in data["kept"].items():
            try:
                kept[layer] = torch.tensor(v, dtype=torch.float64)
            except (TypeError, ValueError) as bad:
                raise ValueError(f"kept[{layer!r}] must be a (candidates, heads) list of numbers: {bad}") from None
        made_for = data["made_for"]
        if made_for is not None:
            _check_fields(made_for, "made_for", _SETTING_FIELDS)
            made_for = CalibrationSetting(made_for["block_q"], made_for["block_k"],
                                          _as_tuple(made_for["tile"], "made_for.tile", 3),
                                          _as_tuple(made_for["depth_range"], "made_for.depth_range", 2),
                                          _as_tuple(made_for["bounds"], "made_for.bounds", 4))
        return cls(data["target"], tuple(candidates), kept, dict(data["choice"]), made_for)


def _narrowest_reaching(kept: torch.Tensor, target: float) -> list[int]:
    """Per head, the first candidate whose kept mass ``kept: (candidates, H)`` reaches ``target``;
    ``DENSE`` where none does."""
    reaches = kept >= target
    first = reaches.float().argmax(0)  # first True (0 when none: DENSE below)
    return [int(f) if reaches[:, h].any() else DENSE for h, f in enumerate(first)]


def _check_fields(data: object, what: str, fields: tuple[str, ...]) -> None:
    """ValueError unless ``data`` is a JSON object with exactly ``fields``, naming the missing and unknown ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object with fields {list(fields)}, got {type(data).__name__}")
    missing, unknown = [f for f in fields if f not in data], sorted(set(data) - set(fields))
    problems = [f"missing fields {missing}"] * bool(missing) + [f"unknown fields {unknown}"] * bool(unknown)
    if problems:
        raise ValueError(f"{what} has {' and '.join(problems)}: expected exactly {list(fields)}")


def _as_tuple(value: object, what: str, length: int) -> tuple:
    """A JSON list of ``length`` items as a tuple; ValueError naming ``what`` otherwise."""
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"{what} must be a list of {length} numbers, got {value!r}")
    return tuple(value)


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
    check_target(target)
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
