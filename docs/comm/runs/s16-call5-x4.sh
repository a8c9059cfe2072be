#!/usr/bin/env bash
# Session 16, call 7 (lead): the final defaults (43b67e9 and later: ll_defer_acks = 3) on a 4-GPU
# machine, whatever card comes (asked for H100: sessions 15-16's defaults were never timed there).
#   1. every low-latency test and the EpGaps tests on all GPUs (4 ranks on 4 GPUs: the deferred
#      acknowledgements' first run with ranks on separate GPUs beyond 2);
#   2. 2 ranks (GPUs 0,1): the normal A/B default, +p, :m16 and the LL A/B new, newU (+ graph);
#   3. all GPUs: the defaults' table and the LL A/B new, newU (+ graph).
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/s16-call5-x4.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s16_call5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
n=$(nvidia-smi -L | grep -c '^GPU')
all=$(seq -s, 0 $((n - 1)))
nvidia-smi -L
CUDA_VISIBLE_DEVICES=$all timeout 200 "$bin/test_comm_gpu" --gtest_filter='*LowLatency*:EpGaps.*' \
  > "$R/tests.log" 2>&1
el "1. tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$R/tests.log" | head -20
pack
COMMON=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --commit "${FP8MOE_COMMIT:-unknown}")
CUDA_VISIBLE_DEVICES=0,1 timeout 90 "$bin/ep_bench" --ab default,default+p,default:m16 --ab-rounds 3 \
  "${COMMON[@]}" --out "$R/ab_x2.jsonl" > "$R/ab_x2.log" 2>&1
el "2a. ab x2 rc=$?"
grep -E "^# ab normal +(dispatch_layout_only|combine|dispatch) " "$R/ab_x2.log"
CUDA_VISIBLE_DEVICES=0,1 timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
  --ll-variants new,newU --ll-graph 8 --out "$R/ll_x2.jsonl" --date "$d" > "$R/ll_x2.log" 2>&1
el "2b. ll x2 rc=$?"
grep -E "^# ab_ll_var|^# ll_graph" "$R/ll_x2.log"
pack
CUDA_VISIBLE_DEVICES=$all timeout 120 "$bin/ep_bench" "${COMMON[@]}" --out "$R/defaults_x$n.jsonl" \
  > "$R/defaults_x$n.log" 2>&1
el "3a. defaults x$n rc=$?"
grep -A8 "^| ranks" "$R/defaults_x$n.log"
CUDA_VISIBLE_DEVICES=$all timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
  --ll-variants new,newU --ll-graph 8 --out "$R/ll_x$n.jsonl" --date "$d" > "$R/ll_x$n.log" 2>&1
el "3b. ll x$n rc=$?"
grep -E "^# ab_ll_var|^# ll_graph" "$R/ll_x$n.log"
pack
el done
