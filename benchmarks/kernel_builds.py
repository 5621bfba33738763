"""Which builds of the block-sparse kernel a run makes: ``end_to_end.py`` (same arguments) with every
Triton build of ``_attention_kernel`` logged, with its constexpr flags, the integer arguments Triton
specialised (divisible by 16, or equal to 1) and its host seconds. Tells which call shapes of a
model's warm-up each cost a build after the one tuning. Run it with cold caches::

    rm -rf ~/.triton/cache /tmp/torchinductor_*
    bash benchmarks/run_on_device.sh python benchmarks/kernel_builds.py --log DIR/builds.json \\
        --world hy_worldplay --preset full --chunks 2 --trajectories random_walk_with_returns --ablations all --blocks
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import triton.runtime.jit as jit

import end_to_end

FLAGS = ("HAS_FULL", "HAS_KEEP", "HAS_FULL_KEEP", "MASK_KIND", "IS_CAUSAL", "HAS_SEED", "SPAN_PASS", "EVEN_M",
         "EVEN_N", "BLOCK_M", "BLOCK_N", "USE_TMA")


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
    try:
        end_to_end.main()
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(builds, indent=1))
        print(f"{len(builds)} builds of the block-sparse kernel, {sum(b['seconds'] for b in builds):.1f} s "
              f"in the calls that made them; log in {path}", flush=True)


if __name__ == "__main__":
    main()
