#!/usr/bin/env bash
# On a lent GPU machine: configure with the "device" preset (dependencies from .devdeps, see
# pack_device_deps.sh) and build the given targets (all when none are given).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d .devdeps ]] || { echo "device_build: .devdeps missing: run scripts/pack_device_deps.sh here and carry .devdeps" >&2; exit 2; }
cmake --preset device -DFP8MOE_BUILD_BENCH=ON >/dev/null
if (($#)); then
  cmake --build build-device -j "$(nproc)" --target "$@"
else
  cmake --build build-device -j "$(nproc)"
fi
