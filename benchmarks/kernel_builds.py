"""Which builds of the block-sparse kernel a run makes: ``end_to_end.py`` (same arguments) with every
Triton build of ``_attention_kernel`` logged, with its constexpr flags, the integer arguments Triton
specialised (divisible by 16, or equal to 1) and its host seconds. Tells which call shapes of a
model's warm-up each cost a build after the one tuning. Beside the log (``<log>_phases.json``), the
wall seconds of each phase of the kernel's first launches: every parallel build round
(``_compile_candidates``, with how many calls it built for) and every autotuner timing of a config.
Run it with cold caches::

    rm -rf ~/.triton/cache /tmp/torchinductor_*
    bash benchmarks/run_on_device.sh python benchmarks/kernel_builds.py --log DIR/builds.json \\
        --world hy_worldplay --preset full --chunks 2 --trajectories random_walk_with_returns --ablations all --blocks
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import triton.runtime.autotuner as autotuner
import triton.runtime.jit as jit

import end_to_end
from li_compile.kernels import block_sparse_attention as bsa

FLAGS = ("HAS_FULL", "HAS_KEEP", "HAS_FULL_KEEP", "MASK_KIND", "IS_CAUSAL", "HAS_SEED", "SPAN_PASS", "EVEN_M",
         "EVEN_N", "BLOCK_M", "BLOCK_N", "USE_TMA")


def _function_name(fn) -> str:
    """The name of the Python function under Triton's wrappers (autotuner, heuristics, JIT)."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", "")


def main() -> None:
    log_at = sys.argv.index("--log")
    path = Path(sys.argv[log_at + 1])
    del sys.argv[log_at:log_at + 2]
    builds: list[dict] = []
    build = jit.JITFunction._do_compile

    def logged(self, key, signature, device, constexprs, options, attrs, warmup):
        start = time.perf_counter()
        kernel = build(self, key, signature, device, constexprs, options, attrs, warmup)
        if self.fn.__name__ == "_attention_kernel":
            names = self.arg_names
            values = {names[k[0]]: v for k, v in constexprs.items()}
            builds.append({
                "seconds": round(time.perf_counter() - start, 3),
                "parallel": hasattr(kernel, "result"),
                "flags": {n: values[n] for n in FLAGS if n in values},
                "specialised": sorted(names[k[0]] for k in attrs),
                "equal_to_1": sorted(n for n, v in values.items() if n not in FLAGS and v == 1),
                "warps": options.num_warps, "stages": options.num_stages,
            })
        return kernel

    jit.JITFunction._do_compile = logged
    phases: list[dict] = []
    build_round, bench = bsa._compile_candidates, autotuner.Autotuner._bench

    def timed_round(*args, **kwargs):  # any version's signature (to time an earlier commit's kernels too)
        start, built = time.perf_counter(), len(builds)
        build_round(*args, **kwargs)
        phases.append({"phase": "parallel_builds", "seconds": round(time.perf_counter() - start, 3),
                       "builds": len(builds) - built})

    def timed_bench(self, *args, **kwargs):
        start = time.perf_counter()
        result = bench(self, *args, **kwargs)
        if _function_name(self.fn) == "_attention_kernel":
            phases.append({"phase": "time_config", "seconds": round(time.perf_counter() - start, 3)})
        return result

    bsa._compile_candidates, autotuner.Autotuner._bench = timed_round, timed_bench
    try:
        end_to_end.main()
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(builds, indent=1))
        phases_path = path.with_name(path.stem + "_phases.json")
        phases_path.write_text(json.dumps(phases, indent=1))
        rounds = [p for p in phases if p["phase"] == "parallel_builds"]
        timings = [p for p in phases if p["phase"] == "time_config"]
        print(f"{len(builds)} builds of the block-sparse kernel, {sum(b['seconds'] for b in builds):.1f} s "
              f"in the calls that made them; log in {path}; {len(rounds)} parallel build rounds, "
              f"{sum(p['seconds'] for p in rounds):.1f} s; {len(timings)} config timings, "
              f"{sum(p['seconds'] for p in timings):.1f} s ({phases_path})", flush=True)


if __name__ == "__main__":
    main()
