"""Where a light_interaction chunk spends host time that a dense chunk does not (GPU).

Builds a world (default ``full``) at ``--depth`` blocks, warms up the dense (Inductor) and the
light_interaction run as ``benchmarks/end_to_end.py`` does, then generates ``--chunks`` chunks of
one trajectory with each and prints, per chunk: the whole chunk (synchronised), the host time
before the first model call (context selection, plans, inputs) and the host time of each model
call (enqueueing its kernels: a call that waits on the device here holds the host), and a Python
profile of the chunks' first model calls (chunk 1 on), where the backend looks up the denoising
cache while the device may be idle. Then it
profiles ``--profile-chunks`` more chunks of each run with ``torch.profiler`` and prints the host
operations by self CPU time, with the number of device synchronisations. On CUDA it then runs the
chunks once more under ``torch.cuda.set_sync_debug_mode("warn")`` and prints where in the Python
code each synchronising call was made (the innermost frames of this repository), by count. It also
counts the garbage collector's collections during the timed chunks, with their host milliseconds by
generation (``--gc-freeze``: freeze the objects warm-up left first, so a collection never scans them).

    bash benchmarks/run_on_device.sh python benchmarks/chunk_overhead.py --world matrix_game3 --depth 30 \\
        --chunks 12 --trajectory random_walk_with_returns [--blocks] --out $OUT/overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import dataclasses
import gc
import io
import json
import pstats
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from li_compile.worlds import hy_worldplay, matrix_game3, trajectories
from li_compile.worlds.pipeline import generate
from li_compile.worlds.report_tools import dense_setup, full_context_masked, light_interaction_setup

WORLDS = {"hy_worldplay": hy_worldplay, "matrix_game3": matrix_game3}
SYNC_EVENTS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
               "cudaEventSynchronize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="matrix_game3")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--profile-chunks", type=int, default=2)
    parser.add_argument("--trajectory", default="random_walk_with_returns", choices=sorted(trajectories.TRAJECTORIES))
    parser.add_argument("--blocks", action="store_true", help="only the repeated blocks compiled in both runs, "
                        "the top level eager (as end_to_end.py --blocks)")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after each warm-up: the objects "
                        "compilation left are never scanned by the garbage collector again")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    module = WORLDS[args.world]
    spec = module.PRESETS[args.preset]
    if args.depth is not None:
        spec = dataclasses.replace(spec, depth=args.depth)
    world = module.build(spec, device=args.device)
    total = args.chunks + args.profile_chunks
    trajectory = trajectories.make(args.trajectory, total * spec.chunk_frames, chunk_frames=spec.chunk_frames)
    result = {}
    setups = {"dense": lambda: dense_setup(world, blocks=args.blocks),
              "light_interaction": lambda: light_interaction_setup(world, blocks=args.blocks)}
    for name, make_setup in setups.items():
        torch._dynamo.reset()  # each run compiles afresh: with --blocks both compile the same block code,
        setup = make_setup()  # and together they would pass Dynamo's recompile limit (calls then run eagerly)
        setup.warm_up()
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        print(f"== {name}: {len(gc.get_objects())} objects the garbage collector tracks after warm-up "
              f"({gc.get_freeze_count()} frozen)", flush=True)

        def run(chunks: int, step_hook=None):
            driver = setup.driver(trajectory)  # an empty cache each time: every run's chunks miss alike
            return generate(setup.world, trajectory, driver.policy, chunks, accelerator=driver.accelerator,
                            step_hook=step_hook, mask_full=full_context_masked(world), decode=False)

        calls: list[tuple[int, int, float, float]] = []  # chunk, step, call start, call end (host clock)
        first_calls = cProfile.Profile()

        def hook(chunk, step, model_call):
            profiled = chunk > 0 and step == 0
            start = time.perf_counter()
            if profiled:
                first_calls.enable()
            try:
                out = model_call()
            finally:
                if profiled:
                    first_calls.disable()
            calls.append((chunk, step, start, time.perf_counter()))
            return out

        with GcPauses() as pauses:
            gen = run(args.chunks, hook)
        rows = []
        for c, chunk_s in enumerate(gen.chunk_times):
            mine = [x for x in calls if x[0] == c]
            rows.append({"chunk": c, "chunk_ms": 1000 * chunk_s,
                         "call_host_ms": [round(1000 * (end - start), 2) for _, _, start, end in mine]})
        print(f"== {name}: garbage collections in {args.chunks} chunks, by generation: "
              f"{pauses.summary()}", flush=True)
        text = io.StringIO()
        pstats.Stats(first_calls, stream=text).sort_stats("cumulative").print_stats("li_compile|passes|kernels", 30)
        first_profile = text.getvalue()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            run(total)
        averages = prof.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=30)
        syncs = {e.key: e.count for e in averages if e.key in SYNC_EVENTS}
        print(f"== {name}: per chunk (ms) and host ms per model call")
        for row in rows:
            print(f"  chunk {row['chunk']:3d}  {row['chunk_ms']:8.1f}  calls {row['call_host_ms']}")
        print(f"== {name}: Python profile of the first model call of chunks 1-{args.chunks - 1}")
        print(first_profile)
        print(f"== {name}: profile of {total} chunks (the first {args.chunks} again, then {args.profile_chunks} more)")
        print(table)
        print(f"== {name}: synchronising calls {syncs}")
        result[name] = {"chunks": rows, "syncs": syncs, "table": table, "first_calls": first_profile,
                        "gc_pauses": pauses.summary()}
        if torch.cuda.is_available():
            where = sync_sites(lambda: run(total))
            print(f"== {name}: synchronising calls by site in {total} chunks")
            for site, count in where.most_common(25):
                print(f"  {count:5d}  {site}")
            result[name]["sync_sites"] = [[site, count] for site, count in where.most_common()]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


class GcPauses:
    """Within the scope, the garbage collector's collections and their host milliseconds, by generation
    (a collection of generation 2 scans every tracked object, which compilation leaves by the million)."""

    def __init__(self) -> None:
        self.runs: dict[int, list[float]] = collections.defaultdict(list)
        self._started = 0.0

    def _record(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.runs[info["generation"]].append(1000 * (time.perf_counter() - self._started))

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._record)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._record)

    def summary(self) -> dict[str, dict[str, float]]:
        """{generation: {"count", "total_ms", "max_ms"}}."""
        return {str(g): {"count": len(ms), "total_ms": round(sum(ms), 1), "max_ms": round(max(ms), 1)}
                for g, ms in sorted(self.runs.items())}


def sync_sites(run) -> collections.Counter:
    """Call ``run()`` with CUDA's sync debug mode on: each synchronising call, counted by the
    innermost three frames of this repository's code (``file:line function``) on its Python stack."""
    where: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "li_compile" in f.filename or "benchmarks" in f.filename]
            where[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return where


if __name__ == "__main__":
    main()
