"""The split block-sparse attention (dense span through flash, the rest through Triton, merged by LSE)
vs dense SDPA (flash) vs compiled FlexAttention with the same block mask, at world-model shapes (GPU).

Queries are one chunk (Lq 3840 = 4 latent frames of 24x40, or 8800), keys 1x..8x that; heads 24
(and 40), head dim 128, bf16, blocks of 128. Three layout families at densities 1, 1/2, 1/4, 1/8:

- ``structured`` (the plans' real shape): a static dense span at the end of the keys (the chunk's
  own keys and the recent frames: 60% of the visited blocks) through flash, plus scattered memory
  blocks per head and query block through the Triton kernel. Density 1 is all span: plain SDPA;
- ``random``: per head and query block, random key blocks, all full, no span (Triton only);
- ``frames``: whole latent frames kept or dropped, the chunk's frames always (its whole blocks are
  the span); boundary blocks are partial and read a token-level keep vector (Flex: a mask_mod).

Times are medians of ``triton.testing.do_bench_cudagraph`` (no host launch overhead), SDPA's timed
beside ours in every case (``time_pair``). TFLOP/s count
only visited blocks. Cases run in priority order until ``--budget-s`` is spent (the JSON is
rewritten after every case), each row naming the path that ran (sdpa / cudnn + triton / triton)
and the Triton variant (tma or plain, with the reason). Writes ``attention.json``,
``attention.png`` and ``attention.md`` into ``--out`` and prints a table.

    bash benchmarks/run_on_device.sh python benchmarks/attention.py --out "$OUT" --budget-s 170  # H100/H200, 2-4 min
    python benchmarks/attention.py --out /tmp/a --device cpu --smoke  # a dry run of the script
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from li_compile.kernels.block_layout import BlockLayout, cdiv
import li_compile.kernels.block_sparse_attention as bsa
from li_compile.kernels.split_attention import chunk_span, split_attention, split_layout, split_path

BLOCK = 128
HEAD_DIM = 128
DENSITIES = (1.0, 0.5, 0.25, 0.125)
FLEX_AGREEMENT = 2e-2  # relative error vs our output above which a Flex row is reported invalid
SPAN_SHARE = 0.6  # structured layouts: the share of visited blocks in the dense span (chunk + recent)


def random_layout(heads: int, q_len: int, kv_len: int, density: float, gen: torch.Generator) -> BlockLayout:
    """Per head and query block, round(density * K) random key blocks, all full."""
    q_blocks, kv_blocks = cdiv(q_len, BLOCK), cdiv(kv_len, BLOCK)
    n = max(1, round(density * kv_blocks))
    scores = torch.rand(1, heads, q_blocks, kv_blocks, generator=gen)
    chosen = scores.argsort(-1)[..., :n]
    blocks = torch.zeros(1, heads, q_blocks, kv_blocks, dtype=torch.bool).scatter_(-1, chosen, True)
    return BlockLayout.from_block_mask(blocks, block_q=BLOCK, block_k=BLOCK, q_len=q_len, kv_len=kv_len, full=blocks)


def structured_layout(heads: int, q_len: int, kv_len: int, density: float, gen: torch.Generator):
    """(layout, span): the last round(SPAN_SHARE * density * K) key blocks (the chunk and the recent
    frames, one contiguous run: the static span) for every query, plus scattered memory blocks per
    head and query block up to round(density * K). The layout lists the span too (as a plan would);
    ``split_layout`` removes it for the split path."""
    q_blocks, kv_blocks = cdiv(q_len, BLOCK), cdiv(kv_len, BLOCK)
    visited = max(1, round(density * kv_blocks))
    dense = visited if visited == kv_blocks else max(1, round(SPAN_SHARE * visited))
    span = (kv_blocks - dense, kv_blocks)
    blocks = torch.zeros(1, heads, q_blocks, kv_blocks, dtype=torch.bool)
    blocks[..., span[0]:] = True
    memory = visited - dense
    if memory:
        scores = torch.rand(1, heads, q_blocks, span[0], generator=gen)
        blocks[..., : span[0]].scatter_(-1, scores.argsort(-1)[..., :memory], True)
    layout = BlockLayout.from_block_mask(blocks, block_q=BLOCK, block_k=BLOCK, q_len=q_len, kv_len=kv_len, full=blocks)
    return layout, span


def frames_layout(q_len: int, kv_len: int, frame_tokens: int, density: float, gen: torch.Generator) -> BlockLayout:
    """Keep round(density * frames) whole key frames (the last chunk's frames first, always: the
    density cannot go below theirs, see ``feasible``), shared by heads."""
    frames = cdiv(kv_len, frame_tokens)
    chunk_frames = cdiv(q_len, frame_tokens)
    kept_count = max(chunk_frames, round(density * frames))
    order = torch.cat([torch.arange(frames - chunk_frames, frames), torch.randperm(frames - chunk_frames, generator=gen)])
    kept = torch.zeros(frames, dtype=torch.bool)
    kept[order[:kept_count]] = True
    keep = kept.repeat_interleave(frame_tokens)[:kv_len]
    padded = torch.cat([keep, keep.new_zeros(cdiv(kv_len, BLOCK) * BLOCK - kv_len)]).view(-1, BLOCK)
    any_kept, all_kept = padded.any(-1), padded.all(-1)
    q_blocks = cdiv(q_len, BLOCK)
    blocks = any_kept.expand(q_blocks, -1).contiguous()
    full = all_kept.expand(q_blocks, -1).contiguous()
    return BlockLayout.from_block_mask(
        blocks, block_q=BLOCK, block_k=BLOCK, q_len=q_len, kv_len=kv_len, full=full, key_keep=keep[None]
    )


def flex_block_mask(layout: BlockLayout, heads: int):
    """The same layout as a FlexAttention BlockMask (partial blocks: a mask_mod reading key_keep)."""
    from torch.nn.attention.flex_attention import BlockMask

    def expand(t):
        return None if t is None else t.expand(1, heads, *t.shape[2:]).contiguous()

    def keep_mask(b, h, q_idx, kv_idx):
        return keep[kv_idx]

    keep = None if layout.key_keep is None else layout.key_keep[0]
    mask_mod = None if keep is None else keep_mask

    return BlockMask.from_kv_blocks(
        expand(layout.kv_num_blocks), expand(layout.kv_indices),
        expand(layout.full_kv_num_blocks), expand(layout.full_kv_indices),
        BLOCK_SIZE=(layout.block_q, layout.block_k), mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
    )


def tune_afresh() -> None:
    """Drop this process's kernels and ignore Triton's on-disk tunings: the next launch of each key
    tunes anew. A model run before on the same machine leaves its tunings there, and they are keyed
    by ``AUTOTUNE_KEY`` alone (a Matrix-Game bucket of 13200 queries and this script's 8800-query
    cases share one), so without this a benchmark times another workload's choice."""
    bsa._KERNELS = None
    kernels = bsa._kernels()
    for tuner in (kernels.tuned, kernels.tuned_tma):
        if tuner is not None:
            tuner.cache_results = False


def time_ms(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph, so that host launch overhead (which
    the compiled model hides the same way) does not count; on CPU (a dry run) one timed call."""
    if torch.cuda.is_available():
        return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def time_pair(baseline, ours) -> tuple[float, float]:
    """Milliseconds of ``baseline`` and of ``ours`` (``time_ms``), each the mean of two timings taken
    in the order baseline, ours, ours, baseline: the GPU's clock drifts as it heats over a run, and
    timing the two side by side in mirrored order cancels a drift that is linear in time."""
    first, ours_first, ours_second, second = time_ms(baseline), time_ms(ours), time_ms(ours), time_ms(baseline)
    return (first + second) / 2, (ours_first + ours_second) / 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def make_layout(kind, heads, q_len, kv_len, density, gen, frame_tokens):
    """(layout, span) of one case (span (K, K): no dense span, Triton only)."""
    if kind == "structured":
        return structured_layout(heads, q_len, kv_len, density, gen)
    if kind == "random":
        layout = random_layout(heads, q_len, kv_len, density, gen)
        return layout, (layout.kv_blocks, layout.kv_blocks)
    layout = frames_layout(q_len, kv_len, frame_tokens, density, gen)
    return layout, chunk_span(q_len, kv_len, BLOCK)  # the chunk's frames are always kept


def run_case(heads, q_len, kv_len, kind, density, flex, gen, frame_tokens, device):
    q = torch.randn(1, heads, q_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, heads, kv_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, heads, kv_len, HEAD_DIM, device=device, dtype=torch.bfloat16)
    layout, span = make_layout(kind, heads, q_len, kv_len, density, gen, frame_tokens)
    visited = layout.block_mask().expand(1, heads, -1, -1).sum().item()
    real_density = visited / (heads * layout.q_blocks * layout.kv_blocks)
    layout = layout.to(device)
    block_mask = flex_block_mask(layout, heads)  # Flex gets the whole layout, span included
    rest = split_layout(layout, span)  # ours: the span through flash, the rest through Triton

    with torch.no_grad():
        path = split_path(q, k, v, rest, span)  # also the warm-up: autotunes this shape once
        ours = split_attention(q, k, v, rest, span)
        try:
            theirs = flex(q, k, v, block_mask=block_mask)
            flex_compiled = True
        except Exception as failure:  # noqa: BLE001 - a Flex failure is a row note, not a crash
            print(f"flex failed: {type(failure).__name__}: {failure}", flush=True)
            theirs, flex_compiled = ours, False
        row = {
            "heads": heads, "q_len": q_len, "kv_len": kv_len, "kind": kind, "density": density,
            "visited_density": real_density, "span": list(span), "path": path, "variant": bsa.kernel_variant(),
            "tuned_configs": bsa.tuned_configs(),  # every tuning so far; the one keyed by this shape's q_class ran
            "err_vs_flex": rel_err(ours, theirs), "flex_compiled": flex_compiled,
        }
        row["sdpa_ms"], row["ours_ms"] = time_pair(lambda: F.scaled_dot_product_attention(q, k, v),
                                                   lambda: split_attention(q, k, v, rest, span))
        row["flex_ms"] = time_ms(lambda: flex(q, k, v, block_mask=block_mask)) if flex_compiled else float("nan")
    row.update(derived(row))
    return row


def derived(row: dict) -> dict:
    """TFLOP/s (visited blocks only: every benchmark length is a multiple of BLOCK) and speedups from
    a row's times; Flex's numbers only where its output matched ours (``flex_valid``)."""
    dense_flops = 4 * row["heads"] * HEAD_DIM * row["q_len"] * row["kv_len"]
    sparse_flops = dense_flops * row["visited_density"]
    return {
        "sdpa_tflops": dense_flops / row["sdpa_ms"] / 1e9,
        "ours_tflops": sparse_flops / row["ours_ms"] / 1e9,
        "flex_tflops": sparse_flops / row["flex_ms"] / 1e9,
        "speedup_vs_sdpa": row["sdpa_ms"] / row["ours_ms"],
        "flex_speedup_vs_sdpa": row["sdpa_ms"] / row["flex_ms"],
        "target_speedup": 0.9 / row["visited_density"],
        "flex_valid": row["err_vs_flex"] < FLEX_AGREEMENT and row.get("flex_compiled", True),
        "vs_flex": row["flex_ms"] / row["ours_ms"],
        "meets_target": row["sdpa_ms"] / row["ours_ms"] >= (0.9 / row["visited_density"] if row["visited_density"] < 1 else 0.97),
    }


def markdown(rows: list[dict]) -> str:
    """The results as a markdown table (one line per case)."""
    lines = [
        "| H | Lq | Lk | layout | density | path | SDPA ms (TF/s) | ours ms (TF/s) | ours speedup (target) | Flex ms (TF/s) | Flex speedup | ours vs Flex |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flex = ((f"{r['flex_ms']:.3f} ({r['flex_tflops']:.0f})", f"{r['flex_speedup_vs_sdpa']:.2f}x", f"{r['vs_flex']:.2f}x")
                if r["flex_valid"] else ("n/a", "-", "-"))
        lines.append(
            f"| {r['heads']} | {r['q_len']} | {r['kv_len']} | {r['kind']} | {r['visited_density']:.3f} | {r.get('path', 'triton')} | "
            f"{r['sdpa_ms']:.3f} ({r['sdpa_tflops']:.0f}) | {r['ours_ms']:.3f} ({r['ours_tflops']:.0f}) | "
            f"{r['speedup_vs_sdpa']:.2f}x ({r['target_speedup']:.2f}x){'' if r['meets_target'] else ' MISS'} | {flex[0]} | {flex[1]} | {flex[2]} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Speedup over SDPA per layout family and nominal density, as min-max over every shape run (the
    README's kernel table), with the Triton kernel's TF/s per visited block where it ran alone."""
    def span(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        low, high = min(values), max(values)
        return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}-{high:{fmt}}"

    header = "| layout | " + " | ".join(f"density {d:g}" for d in DENSITIES) + " |"
    lines = [header, "|" + " --- |" * (len(DENSITIES) + 1)]
    for kind in sorted({r["kind"] for r in rows}, key=["structured", "random", "frames"].index):
        of_kind = [r for r in rows if r["kind"] == kind]
        cells = [span([r["speedup_vs_sdpa"] for r in of_kind if r["density"] == d], ".2f") + "x" for d in DENSITIES]
        alone = [r["ours_tflops"] for r in of_kind if r.get("path") == "triton"]
        rate = f" (Triton alone: {span(alone, '.0f')} TF/s per visited block)" if alone else ""
        lines.append(f"| {kind}{rate} | " + " | ".join(c if c != "-x" else "-" for c in cells) + " |")
    lines.append("| target (0.9/density; SDPA's own at 1) | " + " | ".join(
        f"{0.9 / d if d < 1 else 1.0:.2f}x" for d in DENSITIES) + " |")
    return "\n".join(lines)


def check_against_sdpa(gen, device: str) -> dict:
    """Small ragged GQA cases against fp32 SDPA under the expanded mask: the split path (chunk span
    through flash, partial frame blocks through Triton) and the causal path (span in-kernel).
    Relative errors. (Other dtypes and head dims: the CPU tests.)"""
    q = torch.randn(2, 8, 1000, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 1900, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn(2, 2, 1900, HEAD_DIM, device=device, dtype=torch.bfloat16)
    layout = frames_layout(1000, 1900, 300, 0.5, gen).to(device)
    span = chunk_span(1000, 1900, BLOCK)
    keys = torch.zeros(1900, dtype=torch.bool, device=device)
    keys[span[0] * BLOCK:] = True
    errors = {}
    for name, causal in (("split", False), ("split_causal", True)):
        out = split_attention(q, k, v, split_layout(layout, span), span, is_causal=causal)
        mask = layout.to_dense_mask() | keys
        if causal:
            mask = mask & torch.ones(1000, 1900, dtype=torch.bool, device=device).tril()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        errors[name] = rel_err(out, torch.where(mask.any(-1, keepdim=True), ref, 0))
    return errors


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (heads, q_len, kv_len) in sorted({(r["heads"], r["q_len"], r["kv_len"]) for r in rows if r["kind"] == kind}):
            sel = sorted((r for r in rows if r["kind"] == kind and (r["heads"], r["q_len"], r["kv_len"]) == (heads, q_len, kv_len)),
                         key=lambda r: r["density"])
            x = [r["visited_density"] for r in sel]
            line, = ax.plot(x, [r["speedup_vs_sdpa"] for r in sel], "o-", label=f"ours H={heads} Lq={q_len} Lk={kv_len}")
            flex = [r for r in sel if r["flex_valid"]]
            ax.plot([r["visited_density"] for r in flex], [r["flex_speedup_vs_sdpa"] for r in flex], "x--",
                    color=line.get_color(), alpha=0.6)
        xs = [0.1 + i * 0.01 for i in range(91)]
        ax.plot(xs, [0.9 / x for x in xs], "k:", label="target 0.9/density")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("visited block density")
        ax.set_ylabel("speedup over dense SDPA (x: Flex, dashed)")
        ax.set_title(f"{kind} layouts, bf16, D={HEAD_DIM}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def feasible(kind: str, q_len: int, kv_len: int, density: float) -> bool:
    """Whether a layout family reaches ``density``: frame-drop layouts always keep the chunk's own
    frames, so they go no sparser than q_len / kv_len."""
    return kind != "frames" or density >= q_len / kv_len


def cases(q_len: int, smoke: bool) -> list[tuple[int, int, int, str, float]]:
    """(heads, q_len, kv_len, kind, density) in priority order: the budget cuts from the end."""
    main = [(24, q_len, 4 * q_len, kind, d) for kind in ("structured", "random", "frames") for d in DENSITIES
            if feasible(kind, q_len, 4 * q_len, d)]
    if smoke:
        return [c for c in main if c[3] != "frames"][:6] + [c for c in main if c[3] == "frames"][:2]
    shapes = [(24, q_len, r * q_len) for r in (1, 2, 8)] + [(24, 8800, r * 8800) for r in (1, 2, 4, 8)]
    sweep = [(*shape, "structured", d) for shape in shapes for d in DENSITIES]
    return main + sweep + [(40, q_len, 4 * q_len, kind, d) for kind in ("structured", "random") for d in DENSITIES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="a few shapes only")
    parser.add_argument("--q-len", type=int, default=3840, help="one chunk: 4 frames of 24x40 tokens")
    parser.add_argument("--frame-tokens", type=int, default=960)
    parser.add_argument("--budget-s", type=float, default=170.0, help="start no new case after this many seconds")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (interpreter, tiny --q-len)")
    parser.add_argument("--from-json", type=Path, help="recompute the derived columns of a raw result, replot, print")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["rows"] = [row for row in result["rows"] if feasible(row["kind"], row["q_len"], row["kv_len"], row["density"])]
        for row in result["rows"]:
            row.update(derived(row))
        finish(result, args.out)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64  # one Flex compile per shape; past the limit Flex runs eager
    from torch.nn.attention.flex_attention import flex_attention

    # CPU dry run: eager Flex, which evaluates the mask_mod densely and ignores the block lists, so its
    # error column is meaningless there (the CPU tests check our numbers)
    flex = torch.compile(flex_attention, dynamic=False) if args.device == "cuda" else flex_attention
    gen = torch.Generator().manual_seed(0)
    started = time.time()
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
            "torch": torch.__version__, "triton": triton.__version__, "budget_s": args.budget_s}
    if args.device == "cuda":
        tune_afresh()
        info["err_vs_sdpa_small_ragged_gqa"] = check_against_sdpa(gen, args.device)
    print(info, flush=True)
    rows, todo = [], cases(args.q_len, args.smoke)
    for n, (heads, q_len, kv_len, kind, density) in enumerate(todo):
        if time.time() - started > args.budget_s:
            info["skipped_for_budget"] = [list(c) for c in todo[n:]]
            print(f"budget spent: {len(todo) - n} cases skipped", flush=True)
            break
        try:
            row = run_case(heads, q_len, kv_len, kind, density, flex, gen, args.frame_tokens, args.device)
        except Exception as failure:  # noqa: BLE001 - one failed case is a row, never the end of the run
            row = {"heads": heads, "q_len": q_len, "kv_len": kv_len, "kind": kind, "density": density,
                   "error": f"{type(failure).__name__}: {str(failure)[:500]}"}
            print(f"case failed: {row}", flush=True)
            info.setdefault("failed", []).append(row)
            continue
        rows.append(row)
        print(
            f"H={heads:3d} Lq={q_len:5d} Lk={kv_len:6d} {kind:10s} d={row['visited_density']:.3f} [{row['path']}] "
            f"sdpa {row['sdpa_ms']:7.3f} ms ({row['sdpa_tflops']:4.0f} TF/s) | ours {row['ours_ms']:7.3f} ms "
            f"({row['ours_tflops']:4.0f}) x{row['speedup_vs_sdpa']:.2f} (target x{row['target_speedup']:.2f}) | "
            f"flex {row['flex_ms']:7.3f} ms ({row['flex_tflops']:4.0f}) x{row['flex_speedup_vs_sdpa']:.2f} "
            f"| err {row['err_vs_flex']:.1e} | {row['variant']}",
            flush=True,
        )
        (args.out / "attention.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    info["seconds"] = time.time() - started
    info["kernel_variant"] = bsa.kernel_variant()
    finish({"info": info, "rows": rows}, args.out)


def finish(result: dict, out: Path) -> None:
    """Write attention.json, attention.png and attention.md into ``out``; print the table."""
    (out / "attention.json").write_text(json.dumps(result, indent=1))
    try:
        plot(result["rows"], out / "attention.png")
    except ImportError as missing:  # no matplotlib on the machine: the JSON and table still stand
        print(f"no plot: {missing}")
    table = summary(result["rows"]) + "\n\n" + markdown(result["rows"])
    (out / "attention.md").write_text(table + "\n")
    print(table)
    print(json.dumps(result["info"]))


if __name__ == "__main__":
    main()
