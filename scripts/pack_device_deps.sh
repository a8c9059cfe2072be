#!/usr/bin/env bash
# The lent GPU machines have CUDA, CMake and a compiler but no package registry. This packs the
# headers of our Debian dependencies (fmt in header-only mode, nlohmann-json, CLI11) and the
# GoogleTest sources Debian ships into .devdeps/ (git-ignored), which a device run carries and
# the "device" preset uses (FP8MOE_DEPS_DIR). Nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
rm -rf .devdeps
mkdir -p .devdeps/include
cp -r /usr/include/fmt /usr/include/nlohmann /usr/include/CLI .devdeps/include/
cp -r /usr/src/googletest .devdeps/googletest
echo "packed $(du -sh .devdeps | cut -f1) into .devdeps"
