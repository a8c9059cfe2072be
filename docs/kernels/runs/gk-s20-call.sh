#!/usr/bin/env bash
# Session 20, s20-gk: the model's small GPU kernels (RoPE, embedding, cross-entropy, router
# backward). Predictions and arithmetic: docs/kernels/model_kernels.md. Binaries: branch s20-gk
# (BUILD_INFO.txt), stripped and xz-packed into build-gk/bins.tar.xz.
# Call: run(carry=["build-gk"], command="bash build-gk/run.sh")
#   1. ModelKernelsGpu.* (test_model_gpu), RouterBackwardGpu.* (test_moe_gpu) and the CPU
#      references (test_model ModelKernelsReference.*), each under a timeout;
#   2. model_kernels_bench (rows in model_kernels.jsonl).
# One archive back: $OUT/gk_s20.tgz. Expected < 100 s wall (+ a cold start).
set -uo pipefail
bin=build-gk/bin archive=build-gk/bins.tar.xz name=gk_s20
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-gk/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"

# 1. Tests.
timeout 60 "$bin/test_model" --gtest_filter='ModelKernelsReference*' > "$R/tests_cpu.log" 2>&1
el "1a. cpu reference tests rc=$?"
timeout 120 "$bin/test_model_gpu" --gtest_filter='ModelKernelsGpu*' > "$R/tests.log" 2>&1
rc1=$?
el "1b. ModelKernelsGpu rc=$rc1"
timeout 60 "$bin/test_moe_gpu" --gtest_filter='RouterBackwardGpu*' >> "$R/tests.log" 2>&1
rc2=$?
el "1c. RouterBackwardGpu rc=$rc2"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^rope|^embedding|^cross-entropy|^router|no CUDA" \
  "$R/tests.log" | head -40
pack

# 2. Bench (also when a test failed: the rows say so through the tests' log beside them).
timeout 150 "$bin/model_kernels_bench" --out "$R/model_kernels.jsonl" --date "$d" \
  --commit "$(grep -m1 '^commit' build-gk/BUILD_INFO.txt | cut -d' ' -f2)" > "$R/bench.log" 2>&1
el "2. bench rc=$?"
cat "$R/bench.log" | head -30
pack
el "done"
