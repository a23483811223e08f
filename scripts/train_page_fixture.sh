#!/usr/bin/env bash
# Meta-train the small Omniglot adapter that tests/test_page.py exports and serves to the
# drawing page: 5-way 1-shot, the strided conv net with 32 channels, meta-batch 8, MAML split
# (the test draws only meta-test characters), --norm support (each drawing is predicted alone).
# 1000 iterations: about 4 minutes on a quiet 2-core CPU (181 s of training and the validations,
# measured 2026-12-06); less on a GPU (DEVICE=cuda). The same run with NORM=transductive and
# NORM=tasknorm (and ITERATIONS=3000) is the measurement of the normalisation modes in
# docs/normalisation.md. The optimizer state is dropped to keep the fixture small.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-tests/fixtures/page_omniglot_5w1s.pt}
ITERATIONS=${ITERATIONS:-1000}
NORM=${NORM:-support}
FULL=${OUT%.pt}.full.pt
"$PY" -m maml train --dataset omniglot --n-way 5 --k-shot 1 --model cnn \
  --model-kwargs '{"hidden": 32}' --iterations "$ITERATIONS" --meta-batch-size 8 --norm "$NORM" \
  --val-every 250 --device "${DEVICE:-cpu}" --checkpoint "$FULL" --overwrite --quiet
"$PY" - "$FULL" "$OUT" <<'PY'
import sys

from maml import checkpoint

state = checkpoint.load(sys.argv[1])
state.pop("format")
state["optimizer"] = None
checkpoint.save(sys.argv[2], state)
PY
rm -f "$FULL" "${FULL%.pt}.best.pt" "${FULL%.pt}.metrics.jsonl"
