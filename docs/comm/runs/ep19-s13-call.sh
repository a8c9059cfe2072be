#!/usr/bin/env bash
# Session 13, ep19: the combine send fed by bulk copies (combine_bulk_rows, ep_bench letter k).
# Binaries: branch ep19 on e107fd7 (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped into build-ep19/ (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep19"], command="bash build-ep19/run.sh")
#   1. the new tests (*Session13Bulk*) under a timeout; a failure skips the timing of k;
#   2. ep_bench --ab default,default+k, two processes x 3 rounds (V3 shape, 64 blocks, chunk 16);
#   3. FP8MOE_EP_TRACE=1, one round of each, for the combine's phase stamps.
# Predictions: docs/comm/README.md "Session 13: the combine fed by bulk copies (ep19)".
# One archive back: $OUT/ep19_call.tgz.
set -uo pipefail
bin=build-ep19 archive=build-ep19/none.tar.xz name=ep19_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 75 "$bin/test_comm_gpu" --gtest_filter='*Session13Bulk*' > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+k
[[ $rc -ne 0 ]] && variants=default && echo "tests failed: k not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 60 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab " "$R/ab_$i.log"
  pack
done
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 40 "$bin/ep_bench" --ab "$variants" --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "3. stamps rc=$?"; grep -E "^# ep_trace_combine|^# ab normal +combine" "$R/trace.log"
pack
el "done"
