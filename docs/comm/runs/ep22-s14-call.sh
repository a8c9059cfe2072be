#!/usr/bin/env bash
# Session 14, ep22: the source-region send's records at their token's index, so the layout-only
# dispatch's payload does not wait for the plan (layout_token_slots, ep_bench letter f; off).
# Binaries: branch ep22 on badac02 (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep22/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep22"], command="bash build-ep22/run.sh")
#   1. the new tests (*Session14TokenSlots*) under a timeout; a failure times the defaults only;
#   2. ep_bench --ab default,default+f, two processes x 3 rounds (V3 shape, 64 blocks, chunk 16);
#   3. FP8MOE_EP_TRACE=1, one round of default and default+f, for the dispatch's phase stamps.
# Predictions: docs/comm/README.md "Session 14: the layout-only send without the plan's slots
# (ep22)". One archive back: $OUT/ep22_call.tgz.
set -uo pipefail
bin=build-ep22/bin archive=build-ep22/bins.tar.xz name=ep22_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 150 "$bin/test_comm_gpu" --gtest_filter='*Session14TokenSlots*' > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+f
# A failing variant is not timed: every new test runs f, so a failure times the defaults only.
[[ $rc -ne 0 ]] && variants=default && echo "tests failed: f not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 75 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab " "$R/ab_$i.log"
  pack
done
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 40 "$bin/ep_bench" --ab "$variants" --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "3. stamps rc=$?"; grep -E "^# ep_trace rank" "$R/trace.log" | tail -8
pack
el "done"
