#!/usr/bin/env bash
# Meta-train the small Omniglot adapter that tests/test_page.py exports and serves to the
# drawing page: 5-way 1-shot, the strided conv net with 32 channels, MAML split (the test draws
# only meta-test characters). 140 iterations: 40 minutes on a loaded 2-core CPU; minutes on a GPU
# (DEVICE=cuda). The optimizer state is dropped to keep the fixture small.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-tests/fixtures/page_omniglot_5w1s.pt}
ITERATIONS=${ITERATIONS:-140}
FULL=${OUT%.pt}.full.pt
"$PY" -m maml train --dataset omniglot --n-way 5 --k-shot 1 --q-query 5 --model cnn \
  --model-kwargs '{"hidden": 32}' --iterations "$ITERATIONS" --meta-batch-size 8 \
  --val-every 100 --val-tasks 50 --checkpoint-every 20 --device "${DEVICE:-cpu}" \
  --checkpoint "$FULL" --overwrite --quiet
"$PY" - "$FULL" "$OUT" <<'PY'
import sys

from maml import checkpoint

state = checkpoint.load(sys.argv[1])
state.pop("format")
state["optimizer"] = None
checkpoint.save(sys.argv[2], state)
PY
rm -f "$FULL" "${FULL%.pt}.best.pt" "${FULL%.pt}.metrics.jsonl"
