#!/usr/bin/env bash
# Session 15, ep28: combine_send_claims (ep_bench letter e; off): the bulk combine send's (chunk,
# source) pairs claimed in chunk-major order from a grid-wide counter by each block's producer
# warp (the consumers read them from a queue in shared memory) instead of the static deal (block
# b: chunks b, b + 64, ...), so that the send's blocks end together (ep27's stamps: 19-27 us apart
# at chunk 8). With FP8MOE_EP_TRACE=1 the claimed send also records the receive's claimed items
# when the last send block ends (the receive's backlog: ep27's second lead).
# Binaries: branch ep28 on 05f101d (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep28/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep28"], command="bash build-ep28/run.sh")
#   1. the new tests (*Session15SendClaims*, the combine-chunk silent peer with claims) and the
#      bulk send's graph replay (its code moved to a header) under a timeout; a failure times the
#      defaults only;
#   2. ep_bench --ab default,default+e,default+e:m4,default+e:m6,default+e:m16, two processes x 3
#      rounds (V3 shape, 64 blocks, chunk 16; the combine's chunk 8 by default), the second with
#      FP8MOE_EP_TRACE=1 (the combine's stamps of each variant's rounds).
# Predictions: docs/comm/README.md "Session 15: the combine's tails (ep28)".
# One archive back: $OUT/ep28_call.tgz.
set -uo pipefail
bin=build-ep28/bin archive=build-ep28/bins.tar.xz name=ep28_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 150 "$bin/test_comm_gpu" \
  --gtest_filter='*Session15SendClaims*:*Session15CombineChunkSilentPeerNamesCombineChunk:*Session13BulkRowsGraphCapturedRoundReplays' \
  > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default+e,default+e:m4,default+e:m6,default+e:m16
# A failing variant is not timed.
[[ $rc -ne 0 ]] && variants=default && echo "tests failed: e not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  pre=()
  [[ $i == 2 ]] && pre=(env FP8MOE_EP_TRACE=1)  # set at all, the stamps are on
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 110 "${pre[@]}" "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
grep -E "ep_trace_combine" "$R/ab_2.log" | head -30
el "done"
