#!/usr/bin/env bash
# Session 18, call 4 (lead): the defaults of a30c6a9 (ll_recv_plan_ids_block, ll5's ids block, the
# low-latency default since this session) on a 4-GPU machine, whatever card comes.
#   1. every low-latency test and the EpGaps tests on all GPUs (the ids block's first run with
#      ranks on separate GPUs beyond 2: its words go to 3 peers);
#   2. all GPUs: the defaults' table and the LL A/B new (I), newB (V, session 17's default), newS
#      (the sender's plan, session 16's) with graph replays.
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/s18-call4-x4.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s18_call4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
n=$(nvidia-smi -L | grep -c '^GPU')
all=$(seq -s, 0 $((n - 1)))
nvidia-smi -L
CUDA_VISIBLE_DEVICES=$all timeout 300 "$bin/test_comm_gpu" --gtest_filter='*LowLatency*:EpGaps.*' \
  > "$R/tests.log" 2>&1
el "1. tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$R/tests.log" | head -20
pack
COMMON=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --commit "${FP8MOE_COMMIT:-unknown}")
CUDA_VISIBLE_DEVICES=$all timeout 120 "$bin/ep_bench" "${COMMON[@]}" --out "$R/defaults_x$n.jsonl" \
  > "$R/defaults_x$n.log" 2>&1
el "2a. defaults x$n rc=$?"
grep -A8 "^| ranks" "$R/defaults_x$n.log"
pack
CUDA_VISIBLE_DEVICES=$all timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
  --ll-variants new,newB,newS --ll-graph 8 --out "$R/ll_x$n.jsonl" --date "$d" > "$R/ll_x$n.log" 2>&1
el "2b. ll x$n rc=$?"
grep -E "^# ab_ll_var|^# ll_graph" "$R/ll_x$n.log"
pack
el done
