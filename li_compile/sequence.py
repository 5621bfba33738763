"""How a world model lays out the token sequence that its attention sees.

The controller needs to know which keys belong to which latent frame (to drop a memory
frame, every one of its tokens must become invisible), and where the current chunk's
queries sit. A world model describes this once with a ``SequenceLayout``; the reference
worlds in ``li_compile.worlds`` expose theirs, and users describe their own model the
same way.

Order of the key sequence, each part contiguous, each frame's tokens in raster order
(``grid_h`` rows of ``grid_w`` tokens)::

    [prefix tokens] [context frame 0] ... [context frame C-1] [chunk frame 0] ... [suffix tokens]

Context frames are the clean frames fed as conditioning (retrieved memory and recent
frames, or a KV cache of them); chunk frames are the frames being denoised. Prefix and
suffix tokens (text, action or register tokens) are always visible.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SequenceLayout:
    """Token layout of one attention call: ``context_frames + chunk_frames`` frames of
    ``grid_h x grid_w`` tokens, plus always-visible prefix/suffix tokens.

    ``queries`` says which part of the sequence the queries cover: ``"all"`` (full-sequence
    models such as HY-WorldPlay, where context tokens pass every layer) or ``"chunk"``
    (KV-cache models such as Matrix-Game-3.0, where only the chunk computes queries).
    """

    context_frames: int
    chunk_frames: int
    grid_h: int
    grid_w: int
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    queries: str = "all"

    def __post_init__(self) -> None:
        for name in ("context_frames", "chunk_frames", "grid_h", "grid_w", "prefix_tokens", "suffix_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SequenceLayout.{name} must be a non-negative int, got {value!r}")
        if self.chunk_frames == 0 or self.grid_h == 0 or self.grid_w == 0:
            raise ValueError(
                "SequenceLayout needs at least one chunk frame and a non-empty grid, got "
                f"chunk_frames={self.chunk_frames}, grid=({self.grid_h}, {self.grid_w})"
            )
        if self.queries not in ("all", "chunk"):
            raise ValueError(f"SequenceLayout.queries must be 'all' or 'chunk', got {self.queries!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def frames(self) -> int:
        return self.context_frames + self.chunk_frames

    @property
    def kv_len(self) -> int:
        """Number of keys: every frame's tokens plus prefix and suffix tokens."""
        return self.prefix_tokens + self.frames * self.tokens_per_frame + self.suffix_tokens

    @property
    def q_len(self) -> int:
        """Number of queries: the whole sequence, or only the chunk's frame tokens."""
        if self.queries == "all":
            return self.kv_len
        return self.chunk_frames * self.tokens_per_frame

    def frame_start(self, frame: int) -> int:
        """Key index of the first token of ``frame`` (context frames first, then chunk frames)."""
        if not 0 <= frame < self.frames:
            raise ValueError(f"frame must be in [0, {self.frames}), got {frame}")
        return self.prefix_tokens + frame * self.tokens_per_frame
