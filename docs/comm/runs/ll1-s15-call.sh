#!/usr/bin/env bash
# Session 15 late, ll1 (prepared for session 16): ll_defer_dispatch_ack (ep_bench --ll-variants
# letter D; off): the low-latency dispatch receive ends without its remote acknowledgement (a
# relaxed add to every source's ll_dispatch.ack counter, the kernel's last store to a peer); the
# rank's next dispatch send gives it at its start (counted on the device). Predictions and
# arithmetic: docs/comm/README.md "Session 15 late: the low-latency dispatch at 2 ranks, prepared
# (ll1)". Binaries: branch ll1 on main 545bf4e + its uncommitted diff (patch
# docs/comm/runs/ll1-s15.patch), `cmake --build build-bundle --target test_comm_gpu ep_bench`,
# stripped and xz-packed into build-ll1/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ll1"], command="bash build-ll1/run.sh")
#   1. the LowLatencyDeferAck tests and the default LL test, 2 GPUs, under a timeout (D is timed
#      only if they pass);
#   2. ep_bench --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 --ll-variants new,newD in two
#      processes (the second also times 8 rounds replayed from one graph: --ll-graph 8);
#   3. one round with FP8MOE_EP_LL_TRACE=1 (the phase stamps of new and newD).
# Read: scripts/comm/ep_ab_table.py ab_1.jsonl ab_2.jsonl --mode low_latency --ll-trace trace.log
# One archive back: $OUT/ll1_s16.tgz. Expected ~2.5 min wall (+ a cold start).
set -uo pipefail
bin=build-ll1/bin archive=build-ll1/bins.tar.xz name=ll1_s16
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ll1/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests.
F='LowLatencyDeferAck.*:NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
timeout 240 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -30
pack
variants=new,newD
[[ $rc -eq 0 ]] || { variants=new; echo "tests failed: D not timed"; }

# 2. A/B, two processes x 6 alternated rounds.
for i in 1 2; do
  extra=()
  [[ $i == 2 ]] && extra=(--ll-graph 8)
  timeout 90 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
    --ll-variants "$variants" "${extra[@]}" --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"
  grep -E "^# ab_ll|^# ll_graph|MISMATCH|mismatch" "$R/ab_$i.log" | head -12
  pack
done

# 3. Stamps, one round each.
FP8MOE_EP_LL_TRACE=1 timeout 40 "$bin/ep_bench" --ab-ll 1 --ll-blocks 64 --ll-chunks 4 \
  --iters 5 --ll-variants "$variants" --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "3. trace rc=$?"
grep -E "ll_trace|ab_ll=" "$R/trace.log" | head -30
pack
el "done"
