#!/usr/bin/env bash
# Session 22, call 7: the GPU trainer on 1, 2 and 4 GPUs of one host (kind nvidia-h100-x4): the
# several-GPU tests at 4 ranks, then the same global batch on 1, 2 and 4 GPUs with phase times.
# Binaries: build-s22/bins.tar.xz (test_train_gpu, the fp8moe CLI, stripped), build-s22/lib.
# Call: run(kind="nvidia-h100-x4", carry=["build-s22/bins.tar.xz", "build-s22/lib"],
#           command="bash docs/train/runs/s22-call7-x4.sh", timeout_s=400)
set -uo pipefail
bin=build-s22/bin archive=build-s22/bins.tar.xz name=s22_call7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-s22/lib:$LD_LIBRARY_PATH
head -5 "$R/machine.txt"
timeout 150 "$bin/test_train_gpu" --gtest_filter='TrainerGpuParallel*' > "$R/train_parallel.log" 2>&1
el "1. TrainerGpuParallel* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|step [0-9]|worst|Expected|Which" \
  "$R/train_parallel.log" | cut -c1-200 | head -30
pack
run() {  # name, ranks, config flags...
  local n=$1 r=$2; shift 2
  if [[ $r == 1 ]]; then
    timeout 100 "$bin/fp8moe" train --device gpu "$@" --phase-times --out "/tmp/s22-$n" > "$R/$n.log" 2>&1
  else
    timeout 120 "$bin/fp8moe" launch -n "$r" -- "$bin/fp8moe" train --device gpu "$@" --phase-times \
      --out "/tmp/s22-$n" > "$R/$n.log" 2>&1
  fi
  el "$n rc=$?"; grep -v "^\[rank [1-9]" "$R/$n.log" | tail -1
  cp "/tmp/s22-$n/metrics.jsonl" "$R/metrics_$n.jsonl" 2>/dev/null
  pack
}
small=(--config configs/small-gpu.json --steps 60 --batch 16 --seq 256 --no-checkpoint --eval-batches 0 --no-progress)
v3=(--config configs/v3-slice.json --steps 12 --batch 4 --seq 1024 --warmup 5 --no-checkpoint --eval-batches 0 --no-progress)
for r in 1 2 4; do run "small_$r" "$r" "${small[@]}"; done
for r in 1 2 4; do run "v3_$r" "$r" "${v3[@]}"; done
args=()
for r in 1 2 4; do args+=("small-gpu $r GPUs=$R/metrics_small_$r.jsonl"); done
for r in 1 2 4; do args+=("v3-slice 4 x 1024, $r GPUs=$R/metrics_v3_$r.jsonl"); done
python3 docs/train/runs/phase_table.py "${args[@]}" | tee "$R/phase_table.md"
pack
el done
