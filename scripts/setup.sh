#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras.
# torch 2.14.1 / torchvision 0.29.1 are the releases this machine serves from disk; the package
# itself only asks for ranges (setup.cfg).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
