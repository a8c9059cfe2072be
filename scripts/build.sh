#!/usr/bin/env bash
# Configure (once) and build with the default preset. Extra arguments go to cmake --build.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${FP8MOE_PRESET:-default}
if [[ ! -f build/CMakeCache.txt || $preset != default ]]; then
  cmake --preset "$preset" >/dev/null
fi
cmake --build --preset "$preset" -j "${FP8MOE_JOBS:-$(nproc)}" "$@"
