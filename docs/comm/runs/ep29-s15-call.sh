#!/usr/bin/env bash
# Session 15 late, ep29 (prepared for session 16): combine_recv_own_first (ep_bench letter h; off):
# a combine receive warp whose item's chunk has not landed at its first look sums the item's own
# partial (this rank's expert rows) into a slot of shared memory before it waits, then adds the
# staged partials in rank order (the same bits); y = 2, the same kernel without the early sums
# (h's control). Both record the receive's tail with FP8MOE_EP_TRACE=1 (claims out, last wait,
# last item, items that waited): ep28's stamps put the receive's end 26-28 us after the send's.
# Binaries: branch ep29 on 02aa85c (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep29/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep29"], command="bash build-ep29/run.sh")
#   1. the new tests (*Session15OwnFirst*, the combine-chunk silent peer with own-first) and the
#      bulk send's graph replay (the receive's epilogue moved into a function) under a timeout;
#      a failure times the defaults only;
#   2. ep_bench --ab default,default+y,default+h,default+h:m4, two processes x 3 rounds (V3 shape,
#      64 blocks, chunk 16; the combine's chunk 8 by default), the second with FP8MOE_EP_TRACE=1
#      (the combine's stamps, and the receive's tail for y and h).
# Predictions: docs/comm/README.md "Session 15 late: the combine receive's tail, prepared (ep29)".
# Read: scripts/comm/ep_ab_table.py ab_1.jsonl ab_2.jsonl; python3 runs/ep29-combine-stamps.py
# ab_2.log. One archive back: $OUT/ep29_call.tgz.
set -uo pipefail
bin=build-ep29/bin archive=build-ep29/bins.tar.xz name=ep29_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 150 "$bin/test_comm_gpu" \
  --gtest_filter='*Session15OwnFirst*:*Session15CombineChunkSilentPeerNamesCombineChunk:*Session13BulkRowsGraphCapturedRoundReplays' \
  > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+y,default+h,default+h:m4
# A failing variant is not timed.
[[ $rc -ne 0 ]] && variants=default && echo "tests failed: h and y not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  pre=()
  [[ $i == 2 ]] && pre=(env FP8MOE_EP_TRACE=1)  # set at all, the stamps are on
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 120 "${pre[@]}" "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
grep -E "ep_trace_combine" "$R/ab_2.log" | head -40
el "done"
