#!/usr/bin/env bash
# Session 19, s19-ep: layout_send_first (ep_bench letter e; off): the layout-only dispatch's send
# kernel launched first and the plan kernel as its programmatic dependent (the receive as the
# plan's), the send's metadata warps polling the plan's published round instead of
# griddepcontrol.wait, so that the payload (token slots: no plan needed) leaves at the send's
# start. Predictions and arithmetic: docs/comm/README.md "Session 19: the layout-only send before
# its plan (s19-ep)". Binaries: branch s19-ep (BUILD_INFO.txt), `cmake --build build-bundle -j1
# --target test_comm_gpu ep_bench`, stripped and xz-packed into build-ep/bins.tar.xz.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep"], command="bash build-ep/run.sh")
#   1. the Session19 tests (2 GPUs) under timeout 150; e is timed only if they pass;
#   2. two processes of ep_bench --ab default,default+e --ab-rounds 3 --graph 4 on GPUs 0,1
#      (timeout 120 each);
#   3. one traced eager round of default+e (FP8MOE_EP_TRACE=1).
# Read: the "# ab normal" lines and the graph summary of ab_*.log; "# ep_trace" lines of
# trace.log. One archive back: $OUT/s19ep.tgz. Expected ~150 s wall (+ a cold start).
set -uo pipefail
bin=build-ep/bin archive=build-ep/bins.tar.xz name=s19ep
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ep/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests.
F='NvlinkTest.Session19*:ForwardTest.Session19*'
timeout 150 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED|Failure|^\[       OK|^\[  SKIPPED" "$R/tests.log" | head -30
pack
variants=default,default+e
[[ $rc -eq 0 ]] || { variants=default; echo "tests failed (rc=$rc): e not timed"; }

# 2. A/B, two processes x 3 alternated rounds, eager and graph.
for i in 1 2; do
  timeout 120 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 --graph 4 --blocks 64 --chunks 16 \
    --ll-blocks 64 --ll-chunks 4 --date "$d" --out "$R/ab_$i.jsonl" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"
  grep -E "^# ab normal|^# summary, graph" -A0 "$R/ab_$i.log" | head -12
  grep -E "^# summary, graph" -A14 "$R/ab_$i.log" | grep -E "layout|graph" | head -10
  grep -E "MISMATCH|mismatch|^ep_bench:" "$R/ab_$i.log" | head -5
  pack
done

# 3. Stamps, one traced eager round of default+e.
if [[ $variants == *e ]]; then
  FP8MOE_EP_TRACE=1 timeout 40 "$bin/ep_bench" --ab default+e --ab-rounds 1 --blocks 64 \
    --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --out "$R/trace.jsonl" \
    > "$R/trace.log" 2>&1
  el "3. trace rc=$?"
  grep -E "ep_trace rank|dispatch_layout_only" "$R/trace.log" | head -12
  pack
fi
el "done"
