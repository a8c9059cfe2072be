#!/usr/bin/env bash
# Session 22: the GPU trainer over the GPUs of one host (expert-parallel MoE, data-parallel rest).
# Binaries: build-s22/bins.tar.xz (test_train_gpu, test_model_gpu, the fp8moe CLI, stripped) and
# build-s22/lib (libsentencepiece, libfmt, libstdc++, libgcc_s).
# Call: run(kind="nvidia-h100-x2", carry=["build-s22/bins.tar.xz", "build-s22/lib"],
#           command="bash docs/train/runs/s22-parallel-call.sh", timeout_s=560)
set -uo pipefail
bin=build-s22/bin archive=build-s22/bins.tar.xz name=s22_parallel
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-s22/lib:$LD_LIBRARY_PATH
head -3 "$R/machine.txt"
timeout 240 "$bin/test_train_gpu" --gtest_filter='TrainerGpuParallel*:AdamWGpu*:TrainStateGpu*' \
  > "$R/train_parallel.log" 2>&1
el "1. TrainerGpuParallel* AdamWGpu* TrainStateGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|step |Expected|Which|error|rank 0\] .*(what|rror)" \
  "$R/train_parallel.log" | cut -c1-200 | head -60
pack
timeout 150 "$bin/test_model_gpu" --gtest_filter='ModelGpu*:DecoderLayerGpu*' > "$R/model.log" 2>&1
el "2. ModelGpu* DecoderLayerGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Expected|Which" "$R/model.log" | cut -c1-170 | head -30
pack
# Timing: the same job (global batch, steps) on one GPU and on two.
small="--config configs/small-gpu.json --steps 100 --batch 16 --seq 256 --no-checkpoint --eval-batches 0 --no-progress"
timeout 90 "$bin/fp8moe" train --device gpu $small --out /tmp/s22-small-1 > "$R/small_1gpu.log" 2>&1
el "3a. small-gpu 1 GPU rc=$?"; tail -1 "$R/small_1gpu.log"
timeout 120 "$bin/fp8moe" launch -n 2 -- "$bin/fp8moe" train --device gpu $small --out /tmp/s22-small-2 \
  > "$R/small_2gpu.log" 2>&1
el "3b. small-gpu 2 GPUs rc=$?"; grep -v "^\[rank 1\]" "$R/small_2gpu.log" | tail -2
cp /tmp/s22-small-1/metrics.jsonl "$R/metrics_small_1gpu.jsonl" 2>/dev/null
cp /tmp/s22-small-2/metrics.jsonl "$R/metrics_small_2gpu.jsonl" 2>/dev/null
pack
v3="--config configs/v3-slice.json --steps 12 --batch 2 --seq 2048 --warmup 5 --no-checkpoint --eval-batches 0 --no-progress"
timeout 100 "$bin/fp8moe" train --device gpu $v3 --out /tmp/s22-v3-1 > "$R/v3_1gpu.log" 2>&1
el "4a. v3-slice 1 GPU rc=$?"; tail -1 "$R/v3_1gpu.log"
timeout 120 "$bin/fp8moe" launch -n 2 -- "$bin/fp8moe" train --device gpu $v3 --out /tmp/s22-v3-2 \
  > "$R/v3_2gpu.log" 2>&1
el "4b. v3-slice 2 GPUs rc=$?"; grep -v "^\[rank 1\]" "$R/v3_2gpu.log" | tail -2
cp /tmp/s22-v3-1/metrics.jsonl "$R/metrics_v3_1gpu.jsonl" 2>/dev/null
cp /tmp/s22-v3-2/metrics.jsonl "$R/metrics_v3_2gpu.jsonl" 2>/dev/null
pack
el done
