#!/usr/bin/env bash
# Cold warm-up of one world with this checkout's kernels and with an earlier commit's, one after the
# other on one machine (the same host's baseline for a change to the kernel's first launches). Each
# run empties Triton's and Inductor's caches first, then runs kernel_builds.py (only the blocks
# compiled, 2 chunks); rows go to OUT/<label>_summary.json, builds to OUT/<label>_builds.json and the
# build rounds and config timings to OUT/<label>_builds_phases.json (label: new, or the commit).
#   bash benchmarks/run_on_device.sh bash benchmarks/warmup_ab.sh matrix_game3 8d763dc "$OUT/ab" [preset: full]
# In place of the commit, a folder holding that commit's kernels/ (a machine without the history):
#   git archive 8d763dc kernels | tar -x -C ab_old   # here; then name ab_old/kernels
set -euo pipefail
world=$1 commit=$2 out=$3 preset=${4:-full}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
saved=$(mktemp -d)
cp -r "$root/kernels" "$saved/kernels"
restore() { rm -rf "$root/kernels"; cp -r "$saved/kernels" "$root/kernels"; }
trap restore EXIT
for label in new "$commit"; do
  if [ "$label" != new ] && [ -d "$commit" ]; then rm -rf "$root/kernels"; cp -r "$commit" "$root/kernels"; label=baseline
  elif [ "$label" != new ]; then git -C "$root" archive "$commit" kernels | tar -x -C "$root"; fi  # the index untouched
  rm -rf ~/.triton/cache /tmp/torchinductor_*
  TRITON_PRINT_AUTOTUNING=1 python "$root/benchmarks/kernel_builds.py" --log "$out/${label}_builds.json" \
    --world "$world" --preset "$preset" --chunks 2 --trajectories random_walk_with_returns --ablations all --blocks \
    --out "$out/$label" --summary "$out/${label}_summary.json" > "$out/$label.log" 2>&1
  tr '\r' '\n' < "$out/$label.log" | grep -i "builds of\|dense:\|all@blocks:\|rror" || true
  restore
done
