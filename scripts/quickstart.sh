#!/usr/bin/env bash
# A fresh machine to the main job: install dependencies, build, run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
echo
echo "== fp8moe numerics accumulation: limited-precision accumulation vs promotion every 128 =="
./build/fp8moe numerics accumulation
