#!/usr/bin/env bash
# Session 20, call 5 (one GPU): s20-tk's GPU RMSNorm and AdamW (merged as 716ef73; steps 1-3 of
# its build-tk/run.sh) and linear_bench with the forward's breakdown.
# Binaries: build-c5/bins.tar.xz (test_kernels_gpu, test_train_gpu, train_kernels_bench,
# linear_bench of main 716ef73+; stripped).
# Call: run(kind="nvidia-h200", carry=["build-c5/bins.tar.xz"], command="bash docs/train/runs/s20-call5.sh")
set -uo pipefail
bin=build-c5/bin archive=build-c5/bins.tar.xz name=s20_call5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv >> "$R/machine.txt" 2>&1
head -3 "$R/machine.txt"
timeout 60 "$bin/test_kernels_gpu" --gtest_filter='RmsNormGpu*' > "$R/test_rmsnorm.log" 2>&1
el "1. RmsNormGpu* rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|^rmsnorm |Expected|Which" "$R/test_rmsnorm.log" | cut -c1-200 | head -40; pack
timeout 60 "$bin/test_train_gpu" --gtest_filter='AdamWGpu*' > "$R/test_adamw.log" 2>&1
el "2. AdamWGpu* rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|^adamw |Expected|Which" "$R/test_adamw.log" | cut -c1-200 | head -30; pack
timeout 90 "$bin/train_kernels_bench" --out "$R/train_kernels.jsonl" --date "$d" --commit 716ef73 > "$R/train_kernels_bench.log" 2>&1
el "3. train_kernels_bench rc=$?"; tail -30 "$R/train_kernels_bench.log"; pack
timeout 150 "$bin/linear_bench" --out "$R/linear.jsonl" --date "$d" --commit s20-call5 > "$R/linear_bench.log" 2>&1
el "4. linear_bench rc=$?"; tail -30 "$R/linear_bench.log"; pack
el done
