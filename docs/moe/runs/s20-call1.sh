#!/usr/bin/env bash
# Session 20, call 1 (nvidia-h100-x2): the two items session 19 prepared, from one bundle of main
# with both patches applied (s19-qt without its bench hunks, which predate naive_swiglu.cuh).
#   qt: the vectorised BF16 quantise-transpose behind FP8MOE_QT_VECTORISED=1 (steps 1-4 of
#       docs/kernels/runs/s19-qt-call.sh) on GPU 0;
#   ml: MoeLayerGpu's tests (docs/comm/runs/s19-ml-call.sh) on 2 GPUs, then 2 ranks on GPU 0.
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"], command="bash docs/moe/runs/s20-call1.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s20_call1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
show() { grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Skipped|rel|bit" "$1" | cut -c1-200 | head -${2:-20}; }
export FP8MOE_QT_VECTORISED=1
CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/test_kernels_gpu" --gtest_filter='*Quantiz*:Requant*' > "$R/qt_tests.log" 2>&1
el "1. *Quantiz*:Requant* (vectorised) rc=$?"; show "$R/qt_tests.log"; pack
CUDA_VISIBLE_DEVICES=0 FP8MOE_QT_VECTORISED=0 timeout 40 "$bin/test_kernels_gpu" --gtest_filter='*Quantiz*:Requant*' > "$R/qt_tests_default.log" 2>&1
el "1b. default path rc=$?"; show "$R/qt_tests_default.log" 8; pack
CUDA_VISIBLE_DEVICES=0 timeout 70 "$bin/test_moe_gpu" --gtest_filter='ExpertFfnBackwardGpu.*' > "$R/qt_backward.log" 2>&1
el "2. ExpertFfnBackwardGpu rc=$?"; show "$R/qt_backward.log"; pack
CUDA_VISIBLE_DEVICES=0 timeout 90 "$bin/quantize_bench" --out "$R/quantize.jsonl" --date "$d" --commit s20-call1 > "$R/quantize_bench.log" 2>&1
el "3. quantize_bench rc=$?"; tail -25 "$R/quantize_bench.log"; pack
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/expert_ffn_bench" --shapes a --out "$R/expert_ffn.jsonl" --date "$d" --commit s20-call1 > "$R/expert_ffn_bench.log" 2>&1
el "4. expert_ffn_bench --shapes a rc=$?"; tail -30 "$R/expert_ffn_bench.log"; pack
unset FP8MOE_QT_VECTORISED
CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/ml_2gpu.log" 2>&1
el "5. MoeLayerApi, 2 GPUs rc=$?"; show "$R/ml_2gpu.log" 30; pack
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/ml_1gpu.log" 2>&1
el "6. MoeLayerApi, 2 ranks on GPU 0 rc=$?"; show "$R/ml_1gpu.log" 20; pack
el done
