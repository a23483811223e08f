#!/usr/bin/env bash
# The main job, from a fresh clone: install, meta-train a sinusoid model (no data to download),
# evaluate it on new tasks, export it, and adapt the exported ONNX file to a new task with
# onnxruntime + numpy only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT_DIR:-runs/quickstart}
ITERATIONS=${ITERATIONS:-2000}
echo "== meta-train: sinusoid, $ITERATIONS iterations =="
$PY -m maml train --dataset sinusoid --iterations "$ITERATIONS" --checkpoint "$OUT/sinusoid.pt" \
  --val-every 500 --log-every 100 --overwrite
echo "== evaluate on 600 new tasks (5-shot, 10 steps) =="
$PY -m maml eval --checkpoint "$OUT/sinusoid.pt" --tasks 600 --k-shot 5 --quiet
echo "== export: the meta-learned init + 10 SGD steps as ONNX, checked against the inner loop =="
$PY -m export --checkpoint "$OUT/sinusoid.pt" --out "$OUT/adapter" --formats onnx --tasks 2
echo "== adapt the ONNX adapter to a new sinusoid (onnxruntime + numpy, no torch) =="
$PY scripts/adapt_onnx.py "$OUT/adapter" --compare "$OUT/sinusoid.pt"
