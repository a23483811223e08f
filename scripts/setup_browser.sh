#!/usr/bin/env bash
# The drawing page's front-end dependencies, idempotent (a second run does nothing):
# - npm packages from web/package-lock.json (onnxruntime-web for the page, playwright-core for
#   its test), and onnxruntime-web's WebAssembly runtime copied into serve/static/vendor/ so that
#   `python -m serve` serves it locally (never from a CDN);
# - Debian's chromium for the browser test (apt-get, as root, only when it is missing).
# Without node/npm or chromium it says so and exits 0: the page then adapts on the service, and
# tests/test_page.py skips with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || echo "setup_browser: could not install chromium; the page test will be skipped" >&2
  else
    echo "setup_browser: chromium missing and apt-get unavailable (not root?); the page test will be skipped" >&2
  fi
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "setup_browser: npm missing; the page will adapt on the service instead of in the browser" >&2
  exit 0
fi
if ! cmp -s web/package-lock.json web/node_modules/.installed-lock.json; then
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
  cp web/package-lock.json web/node_modules/.installed-lock.json
fi
dist=web/node_modules/onnxruntime-web/dist
vendor=serve/static/vendor/onnxruntime-web
mkdir -p "$vendor"
for f in ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm; do
  cmp -s "$dist/$f" "$vendor/$f" || cp "$dist/$f" "$vendor/$f"
done
