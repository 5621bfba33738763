#!/usr/bin/env bash
# Train the trained_ar world on one GPU (~7 minutes including compile and rendering), then score it
# against the renderer's ground truth and write its attention diagnostics. Run from the repository root:
#
#   bash training/run_trained_ar.sh                          # first run
#   RESUME=path/to/hy_trained_ar.pt bash training/run_trained_ar.sh   # a second ~7-minute stage from those weights
#   RESUME=path/to/checkpoint.pt bash training/run_trained_ar.sh      # finish an interrupted run
#   SMOKE=1 OUT=/tmp/ar bash training/run_trained_ar.sh      # CPU smoke run (tiny world, seconds)
#
# Writes under $OUT (default runs/trained_ar): trained_ar/{hy_trained_ar.pt, checkpoint.pt, train.json,
# loss.png, train.log}, fidelity.json, attention_diagnostics.{json,md}, SHA256SUMS.line.
set -euo pipefail
PY=${PYTHON:-python}   # the interpreter with torch (e.g. PYTHON=.venv/bin/python)
OUT=${OUT:-runs/trained_ar}
BUDGET=${BUDGET:-390}   # seconds of rendering + training (compile included); the evaluations follow
RUN=$OUT/trained_ar
mkdir -p "$RUN"
if [[ -n "${SMOKE:-}" ]]; then
  TRAIN=(--smoke --device cpu --steps 2 --clips 2 --clip-frames 16 --batch 4 --sigma-groups 2 --checkpoint-every 1)
  EVAL=(--device cpu --frames 16 --per-trajectory 1)
  DIAG=(--smoke --device cpu)
else
  # recipe: the trained world's (compiled, bf16 autocast, qk_gain 2, PRoPE, EMA), batch 64 in 4 sigma groups
  TRAIN=(--device cuda --time-budget "$BUDGET" --batch 64 --sigma-groups 4 --clips 1024 --clip-frames 40
         --lr 6e-4 --warmup 200 --checkpoint-every 200)
  EVAL=(--device cuda --frames 48 --per-trajectory 1)
  DIAG=(--device cuda --weights "$RUN/hy_trained_ar.pt")
fi
if [[ -n "${RESUME:-}" ]]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if 'optimizer' in torch.load(sys.argv[1], map_location='cpu', weights_only=True) else 1)" "$RESUME"; then
    [[ -e "$RUN/checkpoint.pt" ]] || cp "$RESUME" "$RUN/checkpoint.pt"   # train() resumes from it
  else
    TRAIN+=(--init "$RESUME" --lr 3e-4 --warmup 50)   # a second stage from exported weights
  fi
fi
"$PY" -m training.train_world --preset trained_ar --out "$RUN" "${TRAIN[@]}" 2>&1 | tee "$RUN/train.log"
(cd "$RUN" && sha256sum hy_trained_ar.pt) > "$OUT/SHA256SUMS.line"
if [[ -n "${SMOKE:-}" ]]; then exit 0; fi   # the tiny world has no held-out evaluation
"$PY" -m benchmarks.trained_world --preset trained_ar --weights "$RUN/hy_trained_ar.pt" --json "$OUT/fidelity.json" \
  "${EVAL[@]}" 2>&1 | tee "$OUT/fidelity.log" || echo "fidelity evaluation failed (weights are safe in $RUN)"
"$PY" -m benchmarks.attention_diagnostics --out "$OUT" "${DIAG[@]}" 2>&1 | tee "$OUT/diagnostics.log" \
  || echo "attention diagnostics failed (weights are safe in $RUN)"
