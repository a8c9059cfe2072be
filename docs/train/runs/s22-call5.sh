#!/usr/bin/env bash
# Session 22, call 5: the sharded optimizer (ZeRO-1, --shard-optimizer) and the optimizer state
# over slots (checkpoints assembled from the ranks' parts). Binaries as s22-call3.sh's.
# Call: run(kind="nvidia-h100-x2", carry=["build-s22/bins.tar.xz", "build-s22/lib"],
#           command="bash docs/train/runs/s22-call5.sh", timeout_s=560)
set -uo pipefail
bin=build-s22/bin archive=build-s22/bins.tar.xz name=s22_call5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-s22/lib:$LD_LIBRARY_PATH
head -3 "$R/machine.txt"
timeout 300 "$bin/test_train_gpu" --gtest_filter='TrainerGpu*:AdamWGpu*:TrainStateGpu*' > "$R/train.log" 2>&1
el "1. TrainerGpu* AdamWGpu* TrainStateGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|step [0-9]|Expected|Which|worst|sharded" "$R/train.log" \
  | cut -c1-200 | head -60
pack
run() {  # name, ranks, extra flags, config flags
  local n=$1 r=$2 x=$3; shift 3
  if [[ $r == 1 ]]; then
    timeout 120 "$bin/fp8moe" train --device gpu "$@" $x --phase-times --out "/tmp/s22-$n" > "$R/$n.log" 2>&1
  else
    timeout 150 "$bin/fp8moe" launch -n "$r" -- "$bin/fp8moe" train --device gpu "$@" $x --phase-times \
      --out "/tmp/s22-$n" > "$R/$n.log" 2>&1
  fi
  el "$n rc=$?"; grep -v "^\[rank [1-9]" "$R/$n.log" | tail -1
  cp "/tmp/s22-$n/metrics.jsonl" "$R/metrics_$n.jsonl" 2>/dev/null
  pack
}
small=(--config configs/small-gpu.json --steps 60 --batch 16 --seq 256 --no-checkpoint --eval-batches 0 --no-progress)
v3=(--config configs/v3-slice.json --steps 12 --batch 2 --seq 2048 --warmup 5 --no-checkpoint --eval-batches 0 --no-progress)
run small_2 2 "" "${small[@]}"
run small_2_zero 2 --shard-optimizer "${small[@]}"
run v3_2 2 "" "${v3[@]}"
run v3_2_zero 2 --shard-optimizer "${v3[@]}"
python3 - "$R" <<'PY'
import json, sys, glob, os
for f in sorted(glob.glob(sys.argv[1] + "/metrics_*.jsonl")):
    rows = [json.loads(l) for l in open(f) if '"loss"' in l]
    if len(rows) < 4: continue
    keys = ["fb_ms", "reduce_ms", "adam_ms", "state_ms", "refresh_ms"]
    med = lambda k: sorted(r[k] for r in rows[3:])[len(rows[3:]) // 2]
    el = [r["elapsed_s"] for r in rows]
    dt = sorted((el[i] - el[i - 1]) * 1e3 for i in range(3, len(el)))
    print(os.path.basename(f), "step %.2f ms" % dt[len(dt) // 2], " ".join("%s %.2f" % (k, med(k)) for k in keys if k in rows[-1]))
PY
pack
el done
