"""Per-chunk figures of end-to-end runs: hit and miss chunk times, and the speedup from a given chunk
on (leaving out the first chunks, where light_interaction's compact context buckets run against
dense's padded, masked context). Reads the world JSONs ``benchmarks/end_to_end.py`` writes under
``--out`` (the ones behind the README's rows are in ``benchmarks/results/e2e_runs/``).

    python benchmarks/e2e_chunks.py benchmarks/results/e2e_runs/*.json [--from-chunk 5] [--run all]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def chunk_figures(record: dict, run: str, first: int) -> dict:
    """Speedup over chunks ``first``.. and the min/max light_interaction and dense ms of hits and misses there."""
    chunks = [c for c in record["runs"][run]["per_chunk"] if c["chunk"] >= first]
    hits = [c for c in chunks if c["cache_hits"]]
    misses = [c for c in chunks if not c["cache_hits"]]

    def span(rows: list[dict], key: str) -> str:
        return f"{min(c[key] for c in rows):.0f}-{max(c[key] for c in rows):.0f}" if rows else "-"

    return {
        "speedup": sum(c["dense_ms"] for c in chunks) / sum(c["light_ms"] for c in chunks),
        "chunks": len(chunks), "hits": len(hits),
        "hit_ms": span(hits, "light_ms"), "miss_ms": span(misses, "light_ms"), "dense_ms": span(chunks, "dense_ms"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--from-chunk", type=int, default=5)
    parser.add_argument("--run", default="all")
    args = parser.parse_args()
    print(f"| world | depth | trajectory | chunks from {args.from_chunk} | speedup | hits | hit ms | miss ms | dense ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in args.records:
        record = json.loads(path.read_text())
        if args.run not in record["runs"]:
            continue
        f = chunk_figures(record, args.run, args.from_chunk)
        print(f"| {record['world']} | {record['depth']} | {record['trajectory']} | {f['chunks']} | {f['speedup']:.2f}x | "
              f"{f['hits']} | {f['hit_ms']} | {f['miss_ms']} | {f['dense_ms']} |")


if __name__ == "__main__":
    main()
