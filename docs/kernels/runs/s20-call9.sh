#!/usr/bin/env bash
# Session 20, call 9 (nvidia-h100-x2): the weight gradient's overwrite mode (WgradOutput) through
# the GEMMs, ExpertFfnGpu, LinearFp8Gpu / LinearBf16Gpu and MoeLayerGpu; LinearBf16Gpu's first
# run; then moe_layer_bench and linear_bench with their overwrite rows.
# Binaries: build-c9/bins.tar.xz (main b29fbeb: test_kernels_gpu, test_moe_gpu, test_comm_gpu,
# test_model_gpu, moe_layer_bench, linear_bench).
# Call: run(kind="nvidia-h100-x2", carry=["build-c9/bins.tar.xz"], command="bash docs/kernels/runs/s20-call9.sh")
set -uo pipefail
bin=build-c9/bin archive=build-c9/bins.tar.xz name=s20_call9
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
show() { grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Expected|Which|bit for bit|linear (fp8|bf16)|overwritten|kgrouped" "$1" | cut -c1-220 | head -${2:-30}; }
CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/test_kernels_gpu" --gtest_filter='Fp8WgradGpu.*' > "$R/wgrad.log" 2>&1 &
p1=$!
CUDA_VISIBLE_DEVICES=1 timeout 150 "$bin/test_moe_gpu" --gtest_filter='ExpertFfnBackwardGpu.*' > "$R/ffn_bwd.log" 2>&1 &
p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
el "1. Fp8WgradGpu rc=$r1, ExpertFfnBackwardGpu rc=$r2"; show "$R/wgrad.log" 20; show "$R/ffn_bwd.log" 12; pack
CUDA_VISIBLE_DEVICES=0 timeout 90 "$bin/test_model_gpu" > "$R/model.log" 2>&1
el "2. test_model_gpu rc=$?"; show "$R/model.log" 20; pack
CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/moe_layer.log" 2>&1
el "3. MoeLayerApi* rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|overwritten|graph" "$R/moe_layer.log" | head -12; pack
CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/moe_layer_bench" --iters 6 --out "$R/moe_layer.jsonl" --date "$d" --commit b29fbeb > "$R/moe_layer_bench.log" 2>&1
el "4. moe_layer_bench rc=$?"; tail -10 "$R/moe_layer_bench.log"; pack
CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/linear_bench" --out "$R/linear.jsonl" --date "$d" --commit b29fbeb > "$R/linear_bench.log" 2>&1
el "5. linear_bench rc=$?"; tail -20 "$R/linear_bench.log"; pack
el done
