#!/usr/bin/env bash
# Session 15, ep25: the layout-only send's payload claimed per warp (layout_payload_claims, ep_bench
# letter w = units of one 1024-column step, suffix ":wN" = N steps; off).
# Binaries: branch ep25 on 47adaa1 (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep25/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep25"], command="bash build-ep25/run.sh")
#   1. the new tests (*Session15PayloadClaims*, with the MoE layer's gathered test) under a
#      timeout; a failure times the defaults only;
#   2. ep_bench --ab default,default+w, two processes x 3 rounds (V3 shape, 64 blocks, chunk 16);
#   3. one process: the option's grid and unit (w:l64, w:l112, w:l128, w:w2, w:w7) beside both;
#   4. FP8MOE_EP_TRACE=1, one round of default and default+w, for the dispatch's phase stamps.
# Predictions: docs/comm/README.md "Session 15: the layout-only send's payload claimed per token
# (ep25)". One archive back: $OUT/ep25_call.tgz.
set -uo pipefail
bin=build-ep25/bin archive=build-ep25/bins.tar.xz name=ep25_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 200 "$bin/test_comm_gpu" --gtest_filter='*Session15PayloadClaims*' > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+w
sweep=default,default+w,default+w:l64,default+w:l112,default+w:l128,default+w:w2,default+w:w7
# A failing variant is not timed: every new test runs w, so a failure times the defaults only.
[[ $rc -ne 0 ]] && variants=default && sweep=default && echo "tests failed: w not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 75 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab " "$R/ab_$i.log"
  pack
done
# shellcheck disable=SC2086 # COMMON is a list of arguments
timeout 150 "$bin/ep_bench" --ab "$sweep" --ab-rounds 3 $COMMON \
  --out "$R/sweep.jsonl" --date "$d" > "$R/sweep.log" 2>&1
el "3. sweep rc=$?"; grep -E "^# ab normal +dispatch_layout_only" "$R/sweep.log"
pack
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 40 "$bin/ep_bench" --ab "$variants" --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "4. stamps rc=$?"; grep -E "^# ep_trace rank" "$R/trace.log" | tail -8
pack
el "done"
