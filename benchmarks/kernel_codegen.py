"""What the block-sparse kernel compiles to on Hopper, without a GPU: each launch config built ahead of
time for sm90 (Triton's own compiler), and per build its registers, local (spill) memory and
shared memory (the ``cuobjdump`` Triton ships), and per key loop how the K/V tiles arrive (synchronous loads, asynchronous copies
that the pipeliner issues stages ahead, or TMA copies), plus whether the output stores vectorise.

The variant built is a chunk's sparse call: the flash-seeded path (``HAS_SEED``), full and partial
block lists, ragged query and key counts (``EVEN_M``/``EVEN_N`` false, as HY's buckets), head dim
128, with and without a key keep vector, plain pointer loads and TMA::

    PYTHONPATH=. python benchmarks/kernel_codegen.py [--configs 128,64,4,3 64,64,4,3] [--loads plain tma] [--dtype fp16|bf16] \\
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.cubin_tools import resources
from li_compile.kernels import block_sparse_attention as bsa

POINTERS = {"NUM": "*i32", "IDX": "*i32", "FULL_NUM": "*i32", "FULL_IDX": "*i32", "KEEP": "*u8", "FULL_KEEP": "*u8",
            "MASK": "*u8", "SEED_LSE": "*fp32"}
TENSORS = ("Q", "K", "V", "Out", "SEED_O")  # in the input dtype
VECTOR_STRIDES = {f"stride_{t}{d}" for t in "qkvo" for d in "bhmn"}  # multiples of 16 at head dim 128
TILE = r"tensor<\d+x128x"  # a K or V tile at head dim 128


def build(config: tuple[int, int, int, int], keep: bool, tma: bool, dtype: str = "fp16", arch: int = 90):
    """The kernel for one launch ``config`` (BLOCK_M, BLOCK_N, warps, stages), compiled for ``arch``."""
    if bsa._interpreting():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    block_m, block_n, warps, stages = config
    flags = dict(HAS_FULL=True, HAS_KEEP=keep, HAS_FULL_KEEP=False, MASK_KIND=0, IS_CAUSAL=False, EVEN_D=True,
                 HAS_SEED=True, SPAN_PASS=False, BLOCK_D=128, BLOCK_DV=128, INPUT_PRECISION="ieee",
                 BLOCK_M=block_m, BLOCK_N=block_n, SUBS=max(1, 128 // block_n), EVEN_M=False, EVEN_N=False,
                 FOLD_SCALE=True, USE_TMA=tma)
    fn = bsa._attention_kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name in flags:
            signature[name], constexprs[(i,)] = "constexpr", flags[name]
            continue
        if name in TENSORS:
            signature[name] = f"*{dtype}"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
        if signature[name].startswith("*") or name in VECTOR_STRIDES:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def loops(ttgir: str) -> list[dict[str, int]]:
    """Per ``scf.for`` loop body: K/V tiles loaded synchronously, by asynchronous copy, and by TMA."""
    found = []
    for body in ttgir.split("scf.for")[1:]:
        body = body.split("scf.yield")[0]
        found.append({"sync_tiles": len(re.findall(rf"= tt\.load .*: {TILE}", body)),
                      "async_tiles": len(re.findall(rf"async_copy_global_to_local .*: {TILE}", body)),
                      "tma_tiles": body.count("async_tma_copy_global_to_local")})
    return found


def report(config, keep: bool, tma: bool, dtype: str) -> dict:
    """One build's codegen facts (see the module docstring)."""
    kernel = build(config, keep, tma, dtype)
    stores = re.findall(r"st\.global[.\w]*", kernel.asm["ptx"])
    return {"config": list(config), "keep": keep, "tma": tma, "dtype": dtype, "shared_bytes": kernel.metadata.shared,
            "resources": resources(kernel.asm["cubin"]), "loops": loops(kernel.asm["ttgir"]),
            "stores": len(stores), "vector_stores": sum(".v4" in s for s in stores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=[",".join(map(str, c)) for c in bsa.CUDA_CONFIGS])
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--loads", nargs="*", default=["plain", "tma"], choices=("plain", "tma"))
    parser.add_argument("--json", type=Path, help="write the rows here ('-': stdout, one JSON list)")
    args = parser.parse_args()
    rows = []
    for text in args.configs:
        config = tuple(int(v) for v in text.split(","))
        for tma in (loads == "tma" for loads in args.loads):
            for keep in (False, True):
                try:
                    rows.append(report(config, keep, tma, args.dtype))
                except Exception as failure:  # a config Triton cannot build here: say so, go on
                    rows.append({"config": list(config), "keep": keep, "tma": tma, "error": str(failure)[:200]})
    if args.json is not None and str(args.json) == "-":
        print(json.dumps(rows))
        return
    for row in rows:
        where = f"{tuple(row['config'])} {'tma' if row['tma'] else 'plain'} {'keep' if row['keep'] else 'no keep'}"
        if "error" in row:
            print(f"{where}: build failed: {row['error']}", file=sys.stderr)
            continue
        print(f"{where}: {row['shared_bytes']} B shared, {row['resources']}; loops {row['loops']}; "
              f"stores {row['vector_stores']}/{row['stores']} vectorised")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
