#!/usr/bin/env bash
# Session 19, call 6: the fused SwiGLU kernels (after the backward's several-warps-per-row change)
# and ExpertFfnGpu on the device, from one bundle of main (s19-sw + s19-ff merged).
#   1. test_kernels_gpu --gtest_filter='*Swiglu*' (timeout 120)
#   2. swiglu_bench (timeout 90): fused vs naive, forward and backward
#   3. test_moe_gpu --gtest_filter='*ExpertFfn*' (timeout 150)
#   4. test_comm_gpu --gtest_filter='*ExpertFfn*' (timeout 60): the EP layer with ExpertFfnGpu experts
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"], command="FP8MOE_COMMIT=<sha> bash docs/moe/runs/s19-call6.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s19_call6
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
pat='^\[  (PASSED|FAILED)|FAILED  \]|Failure|^expert_ffn|ExpertFfnGpu|FFN layer|swiglu bwd .*4113 x  7168'
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='*Swiglu*' > "$R/test_swiglu.log" 2>&1
el "1. Swiglu tests rc=$?"
grep -E "$pat" "$R/test_swiglu.log" | cut -c1-200 | head -20
pack
timeout 90 "$bin/swiglu_bench" --out "$R/swiglu.jsonl" --date "$d" \
  --commit "${FP8MOE_COMMIT:-unknown}" > "$R/bench_swiglu.log" 2>&1
el "2. swiglu_bench rc=$?"
cat "$R/bench_swiglu.log"
pack
timeout 150 "$bin/test_moe_gpu" --gtest_filter='*ExpertFfn*' > "$R/test_moe_gpu.log" 2>&1
el "3. test_moe_gpu ExpertFfn rc=$?"
grep -E "$pat" "$R/test_moe_gpu.log" | cut -c1-200 | head -40
pack
timeout 60 "$bin/test_comm_gpu" --gtest_filter='*ExpertFfn*' > "$R/test_comm_gpu.log" 2>&1
el "4. test_comm_gpu ExpertFfn rc=$?"
grep -E "$pat" "$R/test_comm_gpu.log" | cut -c1-200 | head -20
pack
el done
