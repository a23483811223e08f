#!/usr/bin/env bash
# Every GPU check of issues #5 and #7 in one command, sized for a 15-minute lease (at most about
# 10 minutes with its stage limits; a stage that breaks early leaves time to rerun). Run on the
# device machine over a working tree that carries .gpu/ (made by scripts/gpu_prepare.sh). Writes
# at most 8 flat files to $OUT (the device tool's limit): the two benchmark JSONs, the log, and
# the time-to-accuracy run's result, curves, metrics and checkpoint. To continue that training in
# a later slot, copy the returned omniglot-5w1s.model.pt and .model.metrics.jsonl into
# benchmarks/gpu/resume/ (`git add -f` to keep them for a later session) and rerun gpu_prepare.sh.
#   A1. bench_train.py, CUDA rows only, the issue's target setting: 5-way 1-shot, 32 tasks,
#       1 step, with torch.compile and CUDA graphs (>= 50x the loop, exact gradient, <= 1 GB
#       auto-chunked), every row checked against the float64 loop. The lease of 2026-11-26 ran
#       it with a 200 s limit, which cut the compiled + graphed + auto-chunked row: now 300 s.
#   A2. the paper's strided net (what reproduce.py trains) with compile too.
#   B.  reproduce.py omniglot-5w1s on the batched engine for a few minutes, continuing the run
#       kept in benchmarks/gpu/resume/ (gpu_prepare.sh copies it): 600-task evaluation, ONNX
#       adapter checked on the same tasks.
# Each stage has its own timeout, and files are saved as they are made, so a stage cut short
# still returns what it measured. A dry run of stage B on a CPU (A needs CUDA and says so):
#   OUT=/tmp/gpu_dry PY=.venv/bin/python REPRO_ARGS="--iterations 3 --tasks 10 --device cpu" \
#   bash scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
LOG="$OUT/session.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
# stage limits (seconds) and sizes; together at most about 10 minutes
BENCH_S=${BENCH_S:-300}; BENCH2_S=${BENCH2_S:-120}; TRAIN_MIN=${TRAIN_MIN:-1}; REPRO_S=${REPRO_S:-150}
ITERS=${ITERS:-20}; ITERS2=${ITERS2:-10}
if [ -d .gpu/whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repo's packages, from any script
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, higher, fire; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== A1: 5w1s B32 1 step, compile + CUDA graphs =="
timeout "$BENCH_S" $PY scripts/bench_train.py --cuda-only --compile --iterations "$ITERS" \
  --memory-budget-mb 1024 --only "5w1s q15 B32 1 step" --out /tmp/bench1
cp /tmp/bench1/*.json "$OUT/bench_train_1step.json" 2>/dev/null
echo "== A2: the paper's strided net, compile too =="
timeout "$BENCH2_S" $PY scripts/bench_train.py --cuda-only --compile --iterations "$ITERS2" \
  --memory-budget-mb 1024 --only "paper net" --out /tmp/bench2
cp /tmp/bench2/*.json "$OUT/bench_train_other.json" 2>/dev/null

echo "== B: omniglot-5w1s, batched engine, $TRAIN_MIN min of training =="
RUN=/tmp/repro/omniglot-5w1s; mkdir -p "$RUN"
for f in model.pt model.metrics.jsonl; do  # an earlier slot, as this script returned it
  if [ -f ".gpu/resume/omniglot-5w1s.$f" ]; then cp ".gpu/resume/omniglot-5w1s.$f" "$RUN/$f"; fi
done
timeout "$REPRO_S" $PY scripts/reproduce.py omniglot-5w1s --engine batched --minutes "$TRAIN_MIN" \
  --val-every 50 --log-every 10 --out /tmp/repro --data-root .gpu/data/omniglot --quiet \
  ${REPRO_ARGS:-}
for f in result.json curves.png model.metrics.jsonl model.pt; do
  cp "$RUN/$f" "$OUT/omniglot-5w1s.$f" 2>/dev/null
done
date
