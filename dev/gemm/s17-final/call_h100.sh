#!/usr/bin/env bash
# Session 17: the GEMM side of the final validation on one H100 (kind nvidia-h100-x1): every
# kernel test and the default gemm_bench with the bundle of the session's head (128x64 rule).
# Call: run(kind="nvidia-h100-x1", carry=["build-bundle/bins.tar.xz"],
#           command="FP8MOE_COMMIT=<sha> bash dev/gemm/s17-final/call_h100.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=gemm_s17_h100
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
cat "$R/machine.txt"
timeout 200 "$bin/test_kernels_gpu" > "$R/test_kernels_gpu.log" 2>&1
el "test_kernels_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/test_kernels_gpu.log" | head
timeout 60 "$bin/test_moe_gpu" > "$R/test_moe_gpu.log" 2>&1
el "test_moe_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/test_moe_gpu.log" | head
pack
timeout 300 "$bin/gemm_bench" --out "$R/gemm.jsonl" > "$R/gemm_bench.log" 2>&1
el "gemm_bench rc=$?"
grep -E "^dense +fp8moe +m=(64|128) " "$R/gemm_bench.log" | head -20
pack
el done
