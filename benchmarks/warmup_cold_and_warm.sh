#!/usr/bin/env bash
# Warm-up of both runs (dense and light_interaction, only the blocks compiled) twice in a row on one
# machine: first with Triton's and Inductor's caches emptied (a first start), then with the caches
# the first run left (a restart). Summary rows go to OUT/cold_summary.json and OUT/warm_summary.json,
# and every build of the block-sparse kernel (kernel_builds.py) to OUT/cold_builds.json and OUT/warm_builds.json.
#   bash benchmarks/run_on_device.sh bash benchmarks/warmup_cold_and_warm.sh hy_worldplay 2 "$OUT/warmup"
set -euo pipefail
world=$1 chunks=$2 out=$3
mkdir -p "$out"
rm -rf ~/.triton/cache /tmp/torchinductor_*
for start in cold warm; do
  TRITON_PRINT_AUTOTUNING=1 python benchmarks/kernel_builds.py --log "$out/${start}_builds.json" \
    --world "$world" --preset full --chunks "$chunks" \
    --trajectories random_walk_with_returns --ablations all --blocks --out "$out/$start" \
    --summary "$out/${start}_summary.json" > "$out/$start.log" 2>&1
  tr '\r' '\n' < "$out/$start.log" | grep -i "finished after\|builds of\|dense:\|all@blocks:\|rror" || true
done
