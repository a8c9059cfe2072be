#!/usr/bin/env bash
# Session 21: the GPU model and trainer on one GPU. Binaries: build-s21/bins.tar.xz (test_model_gpu,
# test_train_gpu, the fp8moe CLI, stripped) and build-s21/lib (libsentencepiece.so.0 and the
# libstdc++ / libgcc_s it needs: the CLI and test_train_gpu read the tokenizer).
# Call: run(carry=["build-s21/bins.tar.xz", "build-s21/lib"], command="CPU_REF=0 bash docs/train/runs/s21-train-call.sh", timeout_s=500)
set -uo pipefail
bin=build-s21/bin archive=build-s21/bins.tar.xz name=s21_train
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-s21/lib:$LD_LIBRARY_PATH
head -2 "$R/machine.txt"
timeout 150 "$bin/test_model_gpu" --gtest_filter='DecoderLayerGpu*:ModelGpu*' > "$R/model.log" 2>&1
el "1. DecoderLayerGpu* ModelGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|rel |bit-exact|DIFFERS|differ|loss|Expected|Which" \
  "$R/model.log" | cut -c1-170 | head -80
pack
timeout 200 "$bin/test_train_gpu" --gtest_filter='TrainStateGpu*:TrainerGpu*:AdamWGpu*' > "$R/train.log" 2>&1
el "2. TrainStateGpu* TrainerGpu* AdamWGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|step |worst|differ|generated|Expected|Which" \
  "$R/train.log" | cut -c1-170 | head -60
pack
timeout 150 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 300 --batch 16 \
  --seq 256 --out /tmp/s21-small-gpu --no-progress > "$R/train_gpu.log" 2>&1
el "3. fp8moe train --device gpu small-gpu 300 steps rc=$?"
tail -3 "$R/train_gpu.log"; cp /tmp/s21-small-gpu/metrics.jsonl /tmp/s21-small-gpu/loss.svg "$R/" 2>/dev/null
sed -n '1p;100p;200p;300p' "$R/metrics.jsonl" | cut -c1-260
pack
# The CPU trainer on the same config, same machine (16 cores): three steps for its tokens/s
# (~130 s of device time: CPU_REF=0 leaves it out).
if [[ ${CPU_REF:-1} == 1 ]]; then
timeout 150 "$bin/fp8moe" train --config configs/small-gpu.json --steps 300 --stop-after 3 \
  --batch 16 --seq 256 --out /tmp/s21-small-cpu --no-progress --eval-batches 0 > "$R/train_cpu.log" 2>&1
el "4. fp8moe train (cpu) small-gpu 3 steps rc=$?"
tail -2 "$R/train_cpu.log"; cp /tmp/s21-small-cpu/metrics.jsonl "$R/metrics_cpu.jsonl"; cut -c1-200 "$R/metrics_cpu.jsonl" 2>/dev/null | head -3
pack
fi
# V3's layer widths (hidden 7168, 128 heads, q/kv LoRA 1536/512, experts of 2048, 32 experts top-8,
# a dense layer of 18432): tokens/s of a whole training step at realistic GEMM sizes, no checkpoint.
timeout 200 "$bin/fp8moe" train --device gpu --config configs/v3-slice.json --steps 20 --batch 1 \
  --seq 4096 --warmup 5 --no-checkpoint --eval-batches 0 --out /tmp/s21-v3slice --no-progress \
  > "$R/train_v3slice.log" 2>&1
el "5. fp8moe train --device gpu v3-slice 20 steps rc=$?"
tail -3 "$R/train_v3slice.log"; cp /tmp/s21-v3slice/metrics.jsonl "$R/metrics_v3slice.jsonl" 2>/dev/null
sed -n '1p;10p;20p' "$R/metrics_v3slice.jsonl" | cut -c1-250
pack
el done
