#!/usr/bin/env bash
# Session 18, call 5 (lead): the 2-rank numbers of the current defaults on whatever card a 4-GPU
# kind brings (asked as nvidia-h100-x4 because call 4 of this session came as 4 x H100, while every
# x2 call of sessions 15-18 came as H200: the defaults since session 15 have no 2 x H100 table).
#   1. the graph-replay tests of every LL test file on all GPUs (the traced wrapper moved into
#      graph_replays: test code only);
#   2. GPUs 0,1: the defaults' table, the LL A/B new (I), newB (V), newS with graph replays,
#      moe_forward_bench (expanded vs gathered).
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/s18-call5-h100pair.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s18_call5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
n=$(nvidia-smi -L | grep -c '^GPU')
all=$(seq -s, 0 $((n - 1)))
nvidia-smi -L
CUDA_VISIBLE_DEVICES=$all timeout 90 "$bin/test_comm_gpu" --gtest_filter='*GraphCapturedRoundReplays*' \
  > "$R/tests.log" 2>&1
el "1. tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$R/tests.log" | head -20
pack
export CUDA_VISIBLE_DEVICES=0,1
COMMON=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --commit "${FP8MOE_COMMIT:-unknown}")
timeout 120 "$bin/ep_bench" "${COMMON[@]}" --out "$R/defaults_x2.jsonl" > "$R/defaults_x2.log" 2>&1
el "2a. defaults x2 rc=$?"
grep -A8 "^| ranks" "$R/defaults_x2.log"
pack
timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
  --ll-variants new,newB,newS --ll-graph 8 --out "$R/ll_x2.jsonl" --date "$d" > "$R/ll_x2.log" 2>&1
el "2b. ll x2 rc=$?"
grep -E "^# ab_ll_var|^# ll_graph" "$R/ll_x2.log"
pack
timeout 90 "$bin/moe_forward_bench" --rounds 5 --iters 30 --record-align-16 \
  --out "$R/moe_forward_x2.jsonl" > "$R/moe_forward_x2.log" 2>&1
el "2c. moe_forward x2 rc=$?"
grep -E "^op|^forward|^dispatch|^gemm" "$R/moe_forward_x2.log"
pack
el done
