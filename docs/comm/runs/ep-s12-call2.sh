#!/usr/bin/env bash
# Session 12, the lead's second EP call. Binaries: the bundle of `bash scripts/gpu_bundle.sh` at
# 1ea0704 (the lean gathered producer and record_align_128 as defaults).
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s12-call2.sh")
#   1. The layout-only send's granularity: 256 chunks of 16 tokens over 96 send blocks are 2.67
#      chunks a block, so a third of the blocks idle through the last chunk time (the stamps:
#      send_first_end ~86, send_end ~108 us). ep_bench --ab over chunk sizes (:c, every dispatch
#      form and the combine use them) and layout-only send grids (:l), two processes x 3 rounds.
#   2. moe_forward_bench --record-align-16 at the V3 shape and at 64 experts: the gathered forward
#      with the lean producer (records on 128-byte lines, and the 16-byte stride as a third path).
# One archive back: $OUT/ep_s12_call2.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ep_s12_call2
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=0,1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
AB=default,default:c12,default:c20,default:c24,default:l88,default:l104,default:l112
AB=$AB,default:c12:l104,default:c20:l88,default:c24:l112
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 200 "$bin/ep_bench" --ab "$AB" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "1. ab $i rc=$?"; grep -E "^# ab normal +dispatch_layout_only" "$R/ab_$i.log"
  pack
done
for shape in v3 e64; do
  args=""; [[ $shape == e64 ]] && args="--experts 64"
  # shellcheck disable=SC2086 # args is a list of arguments
  timeout 150 "$bin/moe_forward_bench" $args --record-align-16 --rounds 5 --iters 30 \
    --date "$d" --out "$R/moe_forward_$shape.jsonl" > "$R/moe_forward_$shape.log" 2>&1
  el "2. moe_forward_bench $shape rc=$?"; tail -7 "$R/moe_forward_$shape.log"
  pack
done
el "done"
