#!/usr/bin/env bash
# Session 15, ep27 call 2: combine_bulk_packed (ep_bench letter i; off): the bulk combine send's
# ring as 16 row slots shared by the records instead of two stages of 8 (call 1's ncu: the bulk
# send's consumers wait on the stage's full barrier about half of the time).
# Binaries: branch ep27 on 2c7b117 (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep27/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep27"], command="bash build-ep27/run.sh")
#   1. the new tests (*Session15Packed*) under a timeout; a failure times the defaults only;
#   2. ep_bench --ab default,default+i,default+i:g56,default+i:g48, two processes x 3 rounds (V3
#      shape, 64 blocks, chunk 16; the combine's chunk 8 by default), the second with
#      FP8MOE_EP_TRACE=1 (the combine's stamps of each variant's rounds).
# (Cut to fit the budget left after call 1: no separate stamps run, no ncu, no g72.)
# Predictions: docs/comm/README.md "Session 15: the combine's bound after ep26 (ep27)".
# One archive back: $OUT/ep27_call2.tgz.
set -uo pipefail
bin=build-ep27/bin archive=build-ep27/bins.tar.xz name=ep27_call2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 120 "$bin/test_comm_gpu" \
  --gtest_filter='*Session15Packed*' \
  > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+i,default+i:g56,default+i:g48
# A failing variant is not timed.
[[ $rc -ne 0 ]] && variants=default && echo "tests failed: i not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  pre=()
  [[ $i == 2 ]] && pre=(env FP8MOE_EP_TRACE=1)  # set at all, the stamps are on
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 100 "${pre[@]}" "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
grep -E "ep_trace_combine" "$R/ab_2.log" | head -24
el "done"
