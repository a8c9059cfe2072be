#!/usr/bin/env bash
# Session 12, first EP call (prepared at the end of session 11, not run). Binaries: the bundle of
# `bash scripts/gpu_bundle.sh` at session 12's head (build-bundle/bins.tar.xz).
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s12-call1.sh")   (~2 min wall expected)
# Session 11 measured its layout-only send options (now defaults) and ep15's record_align_128 only
# on 2 x H200. This call is their H100 check (say which card the reply names):
#   1. ep_bench --ab default,default+x,default+a, two processes x 3 rounds (x: the layout-only send
#      before session 11; a: records on 128-byte lines, off);
#   2. FP8MOE_EP_TRACE=1 stamps of the defaults (layout-only send, send_first_end);
#   3. moe_forward_bench --record-align-128 at the V3 shape and at 64 experts.
# Land rule for a: faster than default by more than the spread in both processes, nothing slower.
# One archive back: $OUT/ep_s12_call1.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ep_s12_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=0,1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 150 "$bin/ep_bench" --ab default,default+x,default+a --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "1. ab $i rc=$?"; grep -E "^# ab " "$R/ab_$i.log"
  pack
done
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 150 "$bin/ep_bench" --ab default --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "2. stamps rc=$?"; grep -E "^# ep_trace rank" "$R/trace.log" | head -4; pack
for shape in v3 e64; do
  args=""; [[ $shape == e64 ]] && args="--experts 64"
  # shellcheck disable=SC2086 # args is a list of arguments
  timeout 150 "$bin/moe_forward_bench" $args --record-align-128 --rounds 5 --iters 30 \
    --date "$d" --out "$R/moe_forward_$shape.jsonl" > "$R/moe_forward_$shape.log" 2>&1
  el "3. moe_forward_bench $shape rc=$?"; tail -7 "$R/moe_forward_$shape.log"
  pack
done
el "done"
