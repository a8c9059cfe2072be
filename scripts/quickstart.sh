#!/usr/bin/env bash
# A fresh machine to the main job: install dependencies (Debian packages), build, then
#  1. the accumulation-precision study (limited accumulation vs promotion every 128, ~10 s), and
#  2. train the tiny V3-architecture model in FP8 and in BF16 from the same start on the same
#     batches, and print both final losses and their relative gap (a few minutes on 2 cores).
# Extra arguments go to `fp8moe train compare` (e.g. --steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
echo
echo "== fp8moe numerics accumulation =="
./build/fp8moe numerics accumulation
echo
echo "== fp8moe train compare --config configs/tiny.json --steps 300 --out runs/tiny =="
./build/fp8moe train compare --config configs/tiny.json --steps 300 --out runs/tiny "$@"
