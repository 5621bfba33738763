#!/usr/bin/env bash
# Make this checkout importable on a GPU machine with no network and no pip install: the package
# layout (passes/ and kernels/ as li_compile.passes / li_compile.kernels) by symlinks, and the
# light_interaction entry point by a minimal dist-info on PYTHONPATH. Then run the command given.
#   bash benchmarks/run_on_device.sh python benchmarks/end_to_end.py --out "$OUT/e2e"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ln -sfn "$root/passes" "$root/li_compile/passes"
ln -sfn "$root/kernels" "$root/li_compile/kernels"
info="$root/li_compile_dev-0.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: li-compile-dev\nVersion: 0\n' > "$info/METADATA"
printf '[torch_dynamo_backends]\nlight_interaction = li_compile.backend:light_interaction\n' > "$info/entry_points.txt"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
