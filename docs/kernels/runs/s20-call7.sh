#!/usr/bin/env bash
# Session 20, call 7 (one GPU): the vectorised BF16 quantize_1x128 (16 lanes a tile, 16-byte
# loads) on main after s20-dv's merge; LinearFp8Gpu quantising straight to M-major scales when M
# is a multiple of 128. Tests first, then quantize_bench (new vs prev = the generic kernel through
# ld = cols + 4) and linear_bench.
# Binaries: build-c7/bins.tar.xz (test_kernels_gpu, test_model_gpu, quantize_bench, linear_bench).
# Call: run(kind="nvidia-h200", carry=["build-c7/bins.tar.xz"], command="bash docs/kernels/runs/s20-call7.sh")
set -uo pipefail
bin=build-c7/bin archive=build-c7/bins.tar.xz name=s20_call7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
head -2 "$R/machine.txt"
show() { grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|mismatch|Expected|Which|linear fp8" "$1" | cut -c1-200 | head -${2:-30}; }
timeout 150 "$bin/test_kernels_gpu" --gtest_filter='*Quantiz*:Requant*:*Swiglu*:RmsNorm*' > "$R/kernels.log" 2>&1
el "1. kernels quantise tests rc=$?"; show "$R/kernels.log"; pack
timeout 60 "$bin/test_model_gpu" > "$R/model.log" 2>&1
el "2. test_model_gpu rc=$?"; show "$R/model.log"; pack
timeout 90 "$bin/quantize_bench" --out "$R/quantize.jsonl" --date "$d" --commit s20-call7 > "$R/quantize_bench.log" 2>&1
el "3. quantize_bench rc=$?"; grep '"quantize_1x128"' "$R/quantize.jsonl" | sed 's/,"date.*//'; pack
timeout 150 "$bin/linear_bench" --out "$R/linear.jsonl" --date "$d" --commit s20-call7 > "$R/linear_bench.log" 2>&1
el "4. linear_bench rc=$?"; tail -24 "$R/linear_bench.log"; pack
el done
