"""A chunk's context: which past frames it sees, padded into a fixed number of frame slots.

Static shapes need a fixed context length per compiled graph, so the kept frames are placed in
``capacity`` slots, **right-aligned (padding first)**, and a boolean ``valid`` vector marks the
slots that hold a frame. The attention plan (``attention_plan.padded_context_keep``) assumes
exactly this placement; building both here is what keeps the padding side from ever disagreeing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ContextSelection:
    """Which past frames (indices into the generated history) a chunk sees as context.

    ``memory``: retrieved frames, ``recent``: the temporal window; fed in that order (each sorted
    by time). ``capacity``: number of frame slots to pad them to (``None``: the world's full context).
    """

    memory: list[int]
    recent: list[int]
    capacity: int | None = None

    @property
    def frames(self) -> list[int]:
        return list(self.memory) + list(self.recent)

    def check(self, past: int, capacity: int) -> None:
        """Raise ``ValueError`` if the selection repeats a frame, names one outside ``[0, past)`` or
        holds more than ``capacity`` frames."""
        frames = self.frames
        if len(set(frames)) != len(frames):
            raise ValueError(f"context selection repeats frames: memory={self.memory}, recent={self.recent}")
        if any(not 0 <= f < past for f in frames):
            raise ValueError(f"context selection names frames outside [0, {past}): {frames}")
        if len(frames) > capacity:
            raise ValueError(f"context selection holds {len(frames)} frames, more than its capacity {capacity}")


def valid_slots(selection: ContextSelection, capacity: int) -> torch.Tensor:
    """``(capacity,)`` bool: which slots hold a frame (the last ``len(selection.frames)``)."""
    return torch.arange(capacity) >= capacity - len(selection.frames)


def pad_frames(values: torch.Tensor, selection: ContextSelection, capacity: int, fill: torch.Tensor | float = 0.0
               ) -> torch.Tensor:
    """Per-frame ``values (N, ...)`` of the history -> ``(capacity, ...)``: the selected frames
    right-aligned, ``fill`` (broadcast to one frame) in the padding slots before them."""
    selection.check(values.shape[0], capacity)
    frames = selection.frames
    out = torch.empty(capacity, *values.shape[1:], dtype=values.dtype, device=values.device)
    out[: capacity - len(frames)] = fill
    if frames:
        out[capacity - len(frames):] = values[torch.tensor(frames, dtype=torch.long, device=values.device)]
    return out
