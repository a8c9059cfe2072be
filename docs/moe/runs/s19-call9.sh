#!/usr/bin/env bash
# Session 19, call 9 (final, phase 2): the experts' FFN backward (s19-bw) and the forward's tests
# again (ExpertFfn* twice: the gathered == contiguous check once failed on a GPU shared with
# test_comm_gpu, before gpu_test_util.cuh's buffers synchronised the device), then the final
# validation's phase 2 (EP suite, gemm_bench, moe_forward_bench) of the same bundle.
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"],
#           command="FP8MOE_COMMIT=<sha> bash docs/moe/runs/s19-call9.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s19_call9
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
pat='^\[  (PASSED|FAILED)|FAILED  \]|Failure|Expected|Which is|^expert_ffn|requantize_1x128_transpose'
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/test_kernels_gpu" --gtest_filter='Requant*:SwigluGpu*' \
  > "$R/test_kernels.log" 2>&1
el "1. test_kernels_gpu Requant*:SwigluGpu* rc=$?"
grep -E "$pat" "$R/test_kernels.log" | grep -v "swiglu " | head -20
pack
CUDA_VISIBLE_DEVICES=0 timeout 200 "$bin/test_moe_gpu" --gtest_filter='*ExpertFfn*' \
  --gtest_repeat=2 > "$R/test_moe.log" 2>&1
el "2. test_moe_gpu *ExpertFfn* x2 rc=$?"
grep -E "$pat" "$R/test_moe.log" | grep -E "backward|graph|FAIL|Failure|PASSED|gathered.*=0|Expected|Which" | head -50
pack
FULL_PHASES=2 FULL_MOE_FORWARD="--rounds 5 --iters 30 --record-align-16" \
  bash scripts/device_full_validation.sh
el "3. final phase 2 rc=$?"
pack
el done
