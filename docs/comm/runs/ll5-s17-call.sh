#!/usr/bin/env bash
# Session 17 late, ll5 (for session 18): V's ids from a send block of their own (DeviceEpOptions::
# ll_recv_plan_ids_block, ep_bench --ll-variants letter I) and V's combine send without its spill
# (ll_recv_plan_combine_split, letter C); both off. Arithmetic and predictions: docs/comm/README.md
# "Session 17 late: V's ids from a block of their own, prepared (ll5)".
# Binaries: branch ll5 (BUILD_INFO.txt), `cmake --build build-bundle --target test_comm_gpu
# ep_bench`, stripped and xz-packed into build-ll5/bins.tar.xz.
# Call: run(kind="nvidia-h100-x2", carry=["build-ll5"], command="bash build-ll5/run.sh")
#   1. the LowLatencyRecvPlanIdsBlock and LowLatencyRecvPlanCombineSplit tests and the default LL
#      test (I / C timed only if they pass);
#   2. ep_bench --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 --ll-variants
#      new,newI,newI:b63:r68,newC,newIC,newS in two processes (the second also --ll-graph 8);
#      "new" is V (the default since session 17), newI:b63:r68 the ids block inside the default's
#      132 SMs (63 payload + 1 ids send blocks, 68 receive blocks);
#   3. one round with FP8MOE_EP_LL_TRACE=1 (the phase stamps of each variant).
# Read: scripts/comm/ep_ab_table.py ll_1.jsonl ll_2.jsonl --mode low_latency --ll-trace
# ll_trace.log. One archive back: $OUT/ll5_s17.tgz. Expected ~2-2.5 min wall (+ a cold start);
# the timeouts keep it under 235 s (tests 125, A/B 2 x 40, trace 25).
set -uo pipefail
bin=build-ll5/bin archive=build-ll5/bins.tar.xz name=ll5_s17
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ll5/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests.
F='LowLatencyRecvPlanIdsBlock.*:LowLatencyRecvPlanCombineSplit.*'
F+=':NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
timeout 125 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log" | tail -20
[[ $rc -ne 0 ]] && grep -E "Failure|error|Expected|Which is|rank [0-9]" "$R/tests.log" | head -20
pack

# 2. A/B, two processes.
llv=new,newI,newI:b63:r68,newC,newIC,newS
[[ $rc -ne 0 ]] && llv=new,newS && echo "ll5 tests failed (rc=$rc): I and C not timed"
for i in 1 2; do
  extra=()
  [[ $i == 2 ]] && extra=(--ll-graph 8)
  timeout 40 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
    --ll-variants "$llv" "${extra[@]}" --out "$R/ll_$i.jsonl" --date "$d" > "$R/ll_$i.log" 2>&1
  el "2. ll $i rc=$?"
  grep -E "^# ab_ll|^# ll_graph|MISMATCH|mismatch|not old" "$R/ll_$i.log" | head -20
  pack
done

# 3. One traced round.
FP8MOE_EP_LL_TRACE=1 timeout 25 "$bin/ep_bench" --ab-ll 1 --ll-blocks 64 --ll-chunks 4 \
  --iters 5 --ll-variants "$llv" --out "$R/ll_trace.jsonl" --date "$d" > "$R/ll_trace.log" 2>&1
el "3. ll trace rc=$?"
grep -E "^ll_trace" "$R/ll_trace.log" | head -40
pack
el "done"
