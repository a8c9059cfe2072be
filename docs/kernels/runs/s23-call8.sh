#!/usr/bin/env bash
# Session 23 call 8: the pipelined mla_decode kernel (MlaDecodePlan::pipelined): the GPU
# tests against the CPU reference, then mla_decode_bench (ours against the naive anchor).
# Call: run(carry=["build-s23/bins8.tar.xz"], command="bash docs/kernels/runs/s23-call8.sh", timeout_s=300)
set -uo pipefail
bin=build-s23/bin8 archive=build-s23/bins8.tar.xz name=s23_c8
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='MlaDecodeGpu*' > "$R/decode_tests.log" 2>&1
el "1. MlaDecodeGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|mla_decode \]|Expected|Which is|error" "$R/decode_tests.log" | cut -c1-150 | head -60
pack
timeout 200 "$bin/mla_decode_bench" --date "$d" --commit "${FP8MOE_COMMIT:-s23-c8}" --out "$R/mla_decode.jsonl" > "$R/mla_decode_bench.log" 2>&1
el "2. mla_decode_bench rc=$?"; cat "$R/mla_decode_bench.log" | head -30
pack
el done
