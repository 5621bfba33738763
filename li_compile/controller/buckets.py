"""Capacity buckets: a few fixed context sizes, so that dropping frames saves compute yet compiles once.

Full-sequence world models (HY-WorldPlay style) pass every context frame through every layer, so a
pruned frame only stops costing linear and FFN compute if it leaves the sequence. The pipeline
therefore gathers the kept frames into a compact context and pads it, with masked key padding, to
the smallest of a few **capacities** (frame slots) that holds them. Each capacity is one static
shape: the model compiles once per bucket, all of them during warm-up, and never again.
"""

from __future__ import annotations

import math
from typing import Sequence

# Of the largest context. Each bucket is one more whole-model graph to trace at warm-up (about 24 s
# at HY's 54 blocks on an H100). Under the default window rule the recent window stays in every
# context once it has filled, 0.44-0.6 of the largest in the reference worlds (Matrix-Game 4 of 9
# frames, HY 12 of 20), so a bucket below half would serve only the first chunks.
CAPACITY_FRACTIONS = (0.5, 0.75, 1.0)


def capacity_buckets(max_context: int, fractions: Sequence[float] = CAPACITY_FRACTIONS) -> tuple[int, ...]:
    """The distinct context capacities (frame slots), ascending: ``ceil(f * max_context)`` for each
    fraction ``f`` in (0, 1]; always includes ``max_context`` itself so every selection fits."""
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise ValueError(f"max_context must be an int >= 1, got {max_context!r}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"capacity fractions must be a non-empty list of numbers in (0, 1], got {list(fractions)!r}")
    return tuple(sorted({math.ceil(f * max_context) for f in fractions} | {max_context}))


def bucket_for(frames: int, buckets: Sequence[int]) -> int:
    """The smallest capacity in ``buckets`` (ascending) that holds ``frames`` context frames."""
    for capacity in buckets:
        if frames <= capacity:
            return capacity
    raise ValueError(f"{frames} context frames exceed the largest capacity bucket {buckets[-1]}")
