#!/usr/bin/env bash
# Installs what fp8moe needs to build, from Debian packages. Safe to run any number of times:
# packages already present are left alone and apt is not touched at all when nothing is missing.
# The CUDA toolkit is not a Debian package here: when nvcc exists (/usr/local/cuda) the CUDA
# parts are built too, otherwise the build is CPU-only.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libfmt-dev nlohmann-json3-dev libcli11-dev
  libsentencepiece-dev sentencepiece
  clang-format
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all build dependencies present"
fi
