#!/usr/bin/env bash
# Session 23 call 7: the absorbed products with their weight blocks staged in shared memory
# (call 6's ncu: absorb 65 us, unabsorb 51 us a call, most of a batch-1 step) — MlaAbsorbGpu*
# (bit for bit), test_serve_gpu, serve_bench.
# Call: run(carry=["build-s23/bins7.tar.xz"], command="bash docs/serve/runs/s23-call7.sh", timeout_s=300)
set -uo pipefail
bin=build-s23/bin7 archive=build-s23/bins7.tar.xz name=s23_c7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 60 "$bin/test_kernels_gpu" --gtest_filter='MlaAbsorbGpu*:MlaDecodeGpu*' > "$R/kernel_tests.log" 2>&1
el "1. MlaAbsorbGpu*:MlaDecodeGpu* rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/kernel_tests.log" | head
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "2. test_serve_gpu rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|outside" "$R/serve_tests.log" | head
pack
timeout 200 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,8,32,64 --prompt 128 --new 64 \
  --date "$d" --commit "${FP8MOE_COMMIT:-s23-c7}" --out "$R/serve.jsonl" > "$R/serve_bench.log" 2>&1
el "3. serve_bench rc=$?"; cat "$R/serve_bench.log"
pack
el done
