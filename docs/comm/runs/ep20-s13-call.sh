#!/usr/bin/env bash
# Session 13, ep20: the combine receive fed by bulk copies (combine_recv_bulk_rows, ep_bench letter
# v) and the bulk send's streaming stores (combine_bulk_stream_stores, letter e); both off.
# Binaries: branch ep20 on 611f2a6 (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep20/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep20"], command="bash build-ep20/run.sh")
#   1. the new tests (*Session13BulkRecv*) under a timeout; a failure times the defaults only;
#   2. ep_bench --ab default,default+v,default+e,default+ve, two processes x 3 rounds (V3 shape,
#      64 blocks, chunk 16);
#   3. FP8MOE_EP_TRACE=1, one round of default and default+v, for the combine's phase stamps.
# Predictions: docs/comm/README.md "Session 13: the combine receive fed by bulk copies (ep20)".
# One archive back: $OUT/ep20_call.tgz.
set -uo pipefail
bin=build-ep20/bin archive=build-ep20/bins.tar.xz name=ep20_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 70 "$bin/test_comm_gpu" --gtest_filter='*Session13BulkRecv*' > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+v,default+e,default+ve
# A failing variant is not timed: every new test runs v or e, so a failure times the defaults only.
[[ $rc -ne 0 ]] && variants=default && echo "tests failed: v and e not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 75 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab " "$R/ab_$i.log"
  pack
done
tv=default; [[ $variants == *default+v* ]] && tv=default,default+v
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 40 "$bin/ep_bench" --ab "$tv" --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "3. stamps rc=$?"; grep -E "^# ep_trace_combine|^# ab normal +combine" "$R/trace.log"
pack
el "done"
