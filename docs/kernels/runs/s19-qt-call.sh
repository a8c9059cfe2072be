#!/usr/bin/env bash
# Session 20 call (prepared by s19-qt in late session 19): the vectorised BF16 quantise-transpose.
# With FP8MOE_QT_VECTORISED=1 (off by default until this call passes; exported below for every
# step but 1b) kernels::quantize_1x128_transpose takes a new kernel for BF16 input when rows % 16
# == 0, cols % 8 == 0, ld % 8 == 0 and the pointers are aligned (the generic kernel otherwise);
# requantize_1x128_transpose unchanged (timed only). docs/kernels/quantize.md has PREDICTIONS.
#   1. test_kernels_gpu --gtest_filter='*Quantiz*:Requant*' (timeout 120): bit for bit vs the CPU
#   1b. the same without the variable (timeout 40): the default (generic) path still passes
#   2. test_moe_gpu --gtest_filter='ExpertFfnBackwardGpu.*' (timeout 70): the backward uses it twice
#   3. quantize_bench (timeout 90): new vs prev (ld = cols + 4 forces the generic kernel), requant
#   4. expert_ffn_bench --shapes a (timeout 60): the backward's per-step breakdown
# Binaries: build-qt/bins.tar.xz (stripped; BUILD_INFO.txt). Copy: docs/kernels/runs/s19-qt-call.sh.
# Call: run(kind="nvidia-h200", carry=["build-qt"], command="bash build-qt/run.sh"); ~3-4 min wall.
# One archive back: $OUT/s19_qt.tgz.
set -uo pipefail
bin=build-qt/bin archive=build-qt/bins.tar.xz name=s19_qt
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -2 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export FP8MOE_QT_VECTORISED=1
cp build-qt/BUILD_INFO.txt "$R/" 2> /dev/null
commit=$(sed -n 's/^commit: //p' build-qt/BUILD_INFO.txt 2> /dev/null | head -1)
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='*Quantiz*:Requant*' > "$R/test_kernels.log" 2>&1
el "1. *Quantiz*:Requant* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Skipped" "$R/test_kernels.log" | head -20
pack
FP8MOE_QT_VECTORISED=0 timeout 40 "$bin/test_kernels_gpu" --gtest_filter='*Quantiz*:Requant*' \
  > "$R/test_kernels_default.log" 2>&1
el "1b. *Quantiz*:Requant* (default path) rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/test_kernels_default.log" | head -10
pack
timeout 70 "$bin/test_moe_gpu" --gtest_filter='ExpertFfnBackwardGpu.*' > "$R/test_backward.log" 2>&1
el "2. ExpertFfnBackwardGpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Skipped" "$R/test_backward.log" | head -20
pack
timeout 90 "$bin/quantize_bench" --out "$R/quantize.jsonl" --date "$d" \
  --commit "${commit:-unknown}" > "$R/quantize_bench.log" 2>&1
el "3. quantize_bench rc=$?"
tail -30 "$R/quantize_bench.log"
pack
timeout 60 "$bin/expert_ffn_bench" --shapes a --out "$R/expert_ffn.jsonl" --date "$d" \
  --commit "${commit:-unknown}" > "$R/expert_ffn_bench.log" 2>&1
el "4. expert_ffn_bench --shapes a rc=$?"
tail -40 "$R/expert_ffn_bench.log"
pack
el done
