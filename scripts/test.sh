#!/usr/bin/env bash
# The test command: install what is missing, lint, then the whole suite (CPU only; nothing is
# downloaded at test time: packages come from the registries during set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
bash scripts/setup_browser.sh   # chromium + npm packages for the drawing-page test (idempotent)
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
