#!/usr/bin/env bash
# Session 20, s20-at: MLA's causal attention core (kernels/mla_attention.h), forward + backward,
# BF16 mma.sync FlashAttention-2. Design, arithmetic and PREDICTIONS: docs/kernels/attention.md.
# Binaries: branch s20-at (BUILD_INFO.txt), `cmake --build build-bundle -j1 --target
# test_kernels_gpu attention_bench`, stripped, tar cJf build-at/bins.tar.xz.
# Call: run(kind="nvidia-h200", carry=["build-at"], command="bash build-at/run.sh")
#   1. test_kernels_gpu --gtest_filter='MlaAttentionGpu*' under timeout 150 (errors per shape);
#   2. attention_bench (forward, backward, naive cuBLASLt anchor) under timeout 120 -> attention.jsonl.
# One archive back: $OUT/s20at.tgz. Expected < 120 s wall (+ a cold start).
set -uo pipefail
bin=build-at/bin archive=build-at/bins.tar.xz name=s20at
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-at/BUILD_INFO.txt >> "$R/machine.txt" 2> /dev/null
head -3 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

# 1. Tests.
timeout 150 "$bin/test_kernels_gpu" --gtest_filter='MlaAttentionGpu*' > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"
grep -E "^  (forward|backward)|^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED|Failure|^\[       OK" \
  "$R/tests.log" | head -40
pack

# 2. Bench (run even if a test failed: its rows then say how fast a wrong kernel is).
commit=$(grep -o 's20-at at [0-9a-f]*' build-at/BUILD_INFO.txt | awk '{print $3}')
timeout 120 "$bin/attention_bench" --date "$d" --commit "${commit:-unknown}" \
  --out "$R/attention.jsonl" > "$R/bench.log" 2>&1
el "2. bench rc=$?"
cat "$R/bench.log" | head -20
pack
el "done"
