#!/usr/bin/env bash
# The test command: lint, then the whole suite (CPU only; no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
