#!/usr/bin/env bash
# Session 16, call 4 (lead): ll_defer_acks = 3 (ll2's FG) made the default. The whole test_comm_gpu
# in one process on 2 GPUs (every low-latency test now runs the deferrals), then the defaults'
# ep_bench table, then the LL A/B of the new default against U (every receive acknowledging, the
# session-15 kernels) in three processes with 8 graph-replayed rounds.
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/s16-call4.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s16_call4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export CUDA_VISIBLE_DEVICES=0,1
timeout 480 "$bin/test_comm_gpu" > "$R/test_comm_gpu.log" 2>&1
el "1. test_comm_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|tests ran" "$R/test_comm_gpu.log" | head -20
pack
timeout 90 "$bin/ep_bench" --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 \
  --out "$R/defaults.jsonl" --date "$d" --commit "${FP8MOE_COMMIT:-unknown}" > "$R/defaults.log" 2>&1
el "2. defaults rc=$?"
grep -A8 "^| ranks" "$R/defaults.log"
pack
for i in 1 2 3; do
  timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
    --ll-variants new,newU --ll-graph 8 --out "$R/llg_$i.jsonl" --date "$d" > "$R/llg_$i.log" 2>&1
  el "3. ll $i rc=$?"
  grep -E "^# ab_ll_var|^# ll_graph" "$R/llg_$i.log"
  pack
done
el done
