"""What tile order costs at an attention site: the four gathers (q, k, v in; the output back) next to
the dense attention call they serve, for both sequence forms.

Full sequence (HY): q, k, v and the output are all ``kv_len`` long. KV cache (Matrix-Game): the
cache is permuted once per chunk (not timed per step); each step gathers the chunk's q, k, v and
its output (``q_len`` long) only. Prints one row per form: milliseconds per gather set, per SDPA,
and their ratio. Runs on CUDA when present (bf16), else CPU (fp32, smaller by default).

    python benchmarks/tile_permute.py                     # defaults: 24 heads, head dim 128
    python benchmarks/tile_permute.py --frames 8 --chunk 4 --grid 24 40
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from li_compile.sequence import SequenceLayout
from li_compile.tiled_sequence import TiledSequence


def wall_ms(fn, repeats: int) -> list[float]:
    """Wall milliseconds of each of ``repeats`` calls of ``fn()`` after one warm call, the device
    synchronised before and after each."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _median_ms(fn, repeats: int) -> float:
    times = wall_ms(fn, repeats)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--frames", type=int, default=8 if cuda else 4, help="context frames")
    parser.add_argument("--chunk", type=int, default=4 if cuda else 2)
    parser.add_argument("--grid", type=int, nargs=2, default=(24, 40) if cuda else (16, 16))
    parser.add_argument("--heads", type=int, default=24 if cuda else 4)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 64)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20 if cuda else 5)
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    print(f"device {device}, {args.heads} heads x {args.head_dim}, tile (2, 8, 8)")
    print("form   q_len  kv_len  gathers_ms  sdpa_ms  ratio")
    for queries in ("all", "chunk"):
        tiled = TiledSequence(SequenceLayout(args.frames, args.chunk, *args.grid, args.prefix, queries=queries))
        s = tiled.sequence
        q = torch.randn(1, args.heads, s.q_len, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, args.heads, s.kv_len, args.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        if queries == "all":
            gathers = lambda: (tiled.permute_queries(q), tiled.permute_keys(k), tiled.permute_keys(v), tiled.unpermute_outputs(q))  # noqa: E731
        else:  # chunk keys/values are q_len long: the cache was permuted once, at the cache pass
            gathers = lambda: (tiled.permute_queries(q), tiled.permute_queries(q), tiled.permute_queries(q), tiled.unpermute_outputs(q))  # noqa: E731
        g = _median_ms(gathers, args.repeats)
        a = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        print(f"{queries:5}  {s.q_len:5}  {s.kv_len:6}  {g:10.3f}  {a:7.3f}  {g / a:.3f}")


if __name__ == "__main__":
    main()
