#!/usr/bin/env bash
# Session 20, call 4 (nvidia-h100-x2): MoeLayerGpu's backward (s20-mb, merged) with the lead's
# device-layout row counts as the default (MoeLayerOptions::backward_host_counts off: no host
# synchronisation; the expanded path of the test keeps host counts, so "gathered == expanded" also
# checks the two forms against each other) + the graph test of forward + backward; then
# linear_bench again (philox inputs, GEMM workspace) on GPU 0.
# Binaries: build-c4/bins.tar.xz (test_comm_gpu, test_model_gpu, linear_bench; stripped).
# Call: run(kind="nvidia-h100-x2", carry=["build-c4/bins.tar.xz"], command="bash docs/comm/runs/s20-call4.sh")
set -uo pipefail
bin=build-c4/bin archive=build-c4/bins.tar.xz name=s20_call4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
show() { grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Expected|Which|round|replays|seed|linear fp8" "$1" | cut -c1-260 | head -${2:-40}; }
CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/ml_2gpu.log" 2>&1
el "1. MoeLayerApi* on 2 GPUs rc=$?"; show "$R/ml_2gpu.log"; pack
CUDA_VISIBLE_DEVICES=0 timeout 90 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/ml_1gpu.log" 2>&1
el "2. MoeLayerApi* 2 ranks on GPU 0 rc=$?"; show "$R/ml_1gpu.log" 25; pack
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/test_model_gpu" --gtest_filter='LinearFp8Gpu*' > "$R/linear_tests.log" 2>&1
el "3. LinearFp8Gpu* rc=$?"; show "$R/linear_tests.log" 12; pack
CUDA_VISIBLE_DEVICES=0 timeout 200 "$bin/linear_bench" --out "$R/linear.jsonl" --date "$d" --commit s20-call4 > "$R/linear_bench.log" 2>&1
el "4. linear_bench rc=$?"; tail -22 "$R/linear_bench.log"; pack
el done
