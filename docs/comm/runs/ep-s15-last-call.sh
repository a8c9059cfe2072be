#!/usr/bin/env bash
# Session 15 (lead), last call: session 15's two new defaults on whatever card comes (asked for
# H100): ep25's claims (p = off) and ep26's combine chunk 8 (:m16 = the old chunk), two
# processes x 3 rounds at 2 ranks, with the bundle of 2c7b117.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=h100ab
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
nvidia-smi -L
for i in 1 2; do
  CUDA_VISIBLE_DEVICES=0,1 timeout 90 "$bin/ep_bench" --ab default,default+p,default:m16 --ab-rounds 3 \
    --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --out "$R/ab_$i.jsonl" --date "$d" \
    --commit 05f101d > "$R/ab_$i.log" 2>&1
  el "process $i rc=$?"
  grep -E "^# ab normal +(dispatch_layout_only|combine) |nccl|peer" "$R/ab_$i.log" | head -12
  pack
done
