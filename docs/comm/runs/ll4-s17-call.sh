#!/usr/bin/env bash
# Session 17, ll4: ll3's receiver-planned LL dispatch with its ids issued first (DeviceEpOptions::
# ll_recv_plan + ll_recv_plan_early, ep_bench --ll-variants letter E; off by default). Arithmetic
# and predictions: docs/comm/README.md "Session 17: ll3's two waits, prepared (ll4)".
# Binaries: branch ll4 (BUILD_INFO.txt), `cmake --build build-bundle --target test_comm_gpu
# ep_bench`, stripped and xz-packed into build-ll4/bins.tar.xz.
# Call: run(kind="nvidia-h100-x2", carry=["build-ll4"], command="bash build-ll4/run.sh")
#   1. the LowLatencyRecvPlanEarly tests, V's FP8 cases and the default LL test (E timed only if
#      they pass);
#   2. ep_bench --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 --ll-variants new,newV,newE
#      in two processes (the second also --ll-graph 8);
#   3. one round with FP8MOE_EP_LL_TRACE=1 (the phase stamps of each variant).
# Read: scripts/comm/ep_ab_table.py ll_1.jsonl ll_2.jsonl --mode low_latency --ll-trace
# ll_trace.log. One archive back: $OUT/ll4_s17.tgz. Expected ~2-3 min wall (+ a cold start);
# the timeouts keep it under 235 s (tests 120, A/B 2 x 40, trace 25).
set -uo pipefail
bin=build-ll4/bin archive=build-ll4/bins.tar.xz name=ll4_s17
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ll4/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests.
F='LowLatencyRecvPlanEarly.*:LowLatencyRecvPlan.MatchesReferenceFp8AllGpus'
F+=':NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
timeout 120 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log" | tail -20
[[ $rc -ne 0 ]] && grep -E "Failure|error|Expected|Which is|rank [0-9]" "$R/tests.log" | head -20
pack

# 2. A/B, two processes.
llv=new,newV,newE
[[ $rc -ne 0 ]] && llv=new,newV && echo "ll4 tests failed (rc=$rc): E not timed"
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
