#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU lease: fills .gpu/ (ignored by git) with what the bare
# GPU machine lacks, so that one `run` with carry [".gpu"] can do every GPU check at once:
# - wheels for Python 3.12 of the pure-Python dependencies its image does not have (higher,
#   fire + termcolor); torch, onnx, onnxruntime, tqdm and matplotlib are already there;
# - the Omniglot npz arrays (../shared is not sent with the working tree);
# - an earlier GPU slot's checkpoint, if one was brought back into benchmarks/gpu/resume/, so
#   that slots add up to one training run.
# Then, with the device tool:  run(command="bash scripts/gpu_session.sh", carry=[".gpu"],
# timeout_s=600), and copy what comes back into benchmarks/ (see gpu_session.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/data/omniglot .gpu/resume
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  higher==0.2.1 fire termcolor
cp ../shared/data/omniglot/images_background.npz ../shared/data/omniglot/images_evaluation.npz \
  .gpu/data/omniglot/
if [ -d benchmarks/gpu/resume ]; then cp benchmarks/gpu/resume/* .gpu/resume/ 2>/dev/null || true; fi
du -sh .gpu
