#!/usr/bin/env bash
# Session 19, call 10 (last, < 220 s wall): the requantise kernel rewritten (s19-rq) and the first
# expert_ffn_bench run (s19-fb), one bundle of main (a90547f + this script).
#   1. test_kernels_gpu --gtest_filter='Requant*' (timeout 60): bit for bit, and its printed times
#   2. test_moe_gpu --gtest_filter='ExpertFfnBackwardGpu.*' (timeout 70): the backward uses it twice
#   3. expert_ffn_bench (timeout 100): forward/backward graph replays, per-step breakdown, naive anchor
# Call: run(carry=["build-bundle/bins.tar.xz"], command="FP8MOE_COMMIT=<sha> bash docs/moe/runs/s19-call10.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s19_call10
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -2 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0
timeout 60 "$bin/test_kernels_gpu" --gtest_filter='Requant*' > "$R/test_requant.log" 2>&1
el "1. Requant* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|requantize_1x128_transpose" "$R/test_requant.log" | head -20
pack
timeout 70 "$bin/test_moe_gpu" --gtest_filter='ExpertFfnBackwardGpu.*' > "$R/test_backward.log" 2>&1
el "2. ExpertFfnBackwardGpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|expert_ffn backward" "$R/test_backward.log" | head -20
pack
timeout 100 "$bin/expert_ffn_bench" --out "$R/expert_ffn.jsonl" --date "$d" \
  --commit "${FP8MOE_COMMIT:-unknown}" > "$R/bench.log" 2>&1
el "3. expert_ffn_bench rc=$?"
cat "$R/bench.log" | tail -80
pack
el done
