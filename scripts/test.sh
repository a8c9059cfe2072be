#!/usr/bin/env bash
# Builds and runs every test. GPU tests (CTest label "gpu") run only where a GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
args=(--test-dir build --output-on-failure -j "$(nproc)" --timeout 900)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "test: no GPU visible, skipping tests labelled gpu"
  args+=(-LE gpu)
fi
ctest "${args[@]}" "$@"
