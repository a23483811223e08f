#!/usr/bin/env bash
# The test command: install what is missing, lint, then the whole suite (CPU only; nothing is
# downloaded at test time: packages come from the registries during set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
bash scripts/setup_browser.sh   # chromium + npm packages for the drawing-page test (idempotent)
.venv/bin/ruff check .
# the documentation site (mkdocs.yml): strict, so a broken link or anchor fails (not --quiet:
# it hides the warnings that strict counts); built into a temporary folder, then removed
[ -x .venv/bin/mkdocs ] || .venv/bin/python -m pip install -q "mkdocs>=1.6"   # a .venv from before
site=$(mktemp -d)
.venv/bin/mkdocs build --strict --site-dir "$site"
rm -rf "$site"
.venv/bin/python -m pytest -q "$@"
