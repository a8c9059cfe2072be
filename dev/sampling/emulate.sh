#!/usr/bin/env bash
# Runs src/kernels/sampling.cu's kernels on host threads (emulate_shim.h) against the CPU reference
# (no GPU needed): checks the kernel's logic, not its timing or races. Usage (repository root):
#   bash dev/sampling/emulate.sh [build dir with src/libfp8moe_{fp8,core}.a, default build-s]
set -euo pipefail
cd "$(dirname "$0")/../.."
b=${1:-build-s}
t=$(mktemp -d)
python3 - "$t/emulated_kernels.inc" <<'PY'
import sys
s = open("src/kernels/sampling.cu").read()
for inc in ('#include <cuda_runtime.h>\n', '#include "fp8moe/core/cuda_check.h"\n'):
    s = s.replace(inc, "")
s = s.replace('#include "sampling_math.h"', '#include "../../src/kernels/sampling_math.h"')
s = s[: s.index("bool vec_ok(")] + "}  // namespace\n}  // namespace fp8moe::kernels\n"
open(sys.argv[1], "w").write(s)
PY
flags="-std=c++20 -O2 -ffp-contract=off -Wall -Wextra -Wno-unknown-pragmas -Iinclude -I$t -Idev/sampling -DFMT_SHARED"
c++ $flags dev/sampling/emulate_main.cpp src/kernels/sampling_reference.cpp -o "$t/emulate" \
  "$b/src/libfp8moe_fp8.a" "$b/src/libfp8moe_core.a" -lfmt -lpthread
"$t/emulate"
