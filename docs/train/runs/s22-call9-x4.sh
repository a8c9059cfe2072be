#!/usr/bin/env bash
# Session 22, call 9: one BF16 lm_head copy for every head and one expert-gradient scratch for
# every MoE layer (ModelGpu), the trainer's memory report: the model and trainer tests (4 GPUs:
# the several-GPU tests at 4 ranks), then v3-slice on 1, 2 and 4 GPUs (memory in use a rank).
# Binaries: build-s22/bins.tar.xz (test_model_gpu, test_train_gpu, the fp8moe CLI), build-s22/lib.
# Call: run(kind="nvidia-h100-x4", carry=["build-s22/bins.tar.xz", "build-s22/lib"],
#           command="bash docs/train/runs/s22-call9-x4.sh", timeout_s=400)
set -uo pipefail
bin=build-s22/bin archive=build-s22/bins.tar.xz name=s22_call9
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-s22/lib:$LD_LIBRARY_PATH
head -5 "$R/machine.txt"
timeout 120 "$bin/test_model_gpu" --gtest_filter='ModelGpu*:DecoderLayerGpu*:LinearBf16*' > "$R/model.log" 2>&1
el "1. ModelGpu* DecoderLayerGpu* LinearBf16* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Expected|Which" "$R/model.log" | cut -c1-170 | head -20
pack
timeout 200 "$bin/test_train_gpu" --gtest_filter='TrainerGpu*' > "$R/train.log" 2>&1
el "2. TrainerGpu* (4 ranks) rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|step [0-9]|worst|Expected|Which" "$R/train.log" \
  | cut -c1-200 | head -40
pack
v3=(--config configs/v3-slice.json --steps 12 --batch 4 --seq 1024 --warmup 5 --no-checkpoint --eval-batches 0 --no-progress)
for r in 1 2 4; do
  if [[ $r == 1 ]]; then
    timeout 100 "$bin/fp8moe" train --device gpu "${v3[@]}" --phase-times --out /tmp/s22-v3m_1 > "$R/v3m_1.log" 2>&1
  else
    timeout 120 "$bin/fp8moe" launch -n $r -- "$bin/fp8moe" train --device gpu "${v3[@]}" --phase-times \
      --out /tmp/s22-v3m_$r > "$R/v3m_$r.log" 2>&1
  fi
  el "v3-slice $r GPUs rc=$?"; grep -v "^\[rank [1-9]" "$R/v3m_$r.log" | tail -1
  cp /tmp/s22-v3m_$r/metrics.jsonl "$R/metrics_v3m_$r.jsonl" 2>/dev/null
  pack
done
el done
