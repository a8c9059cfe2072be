#!/usr/bin/env bash
# Session 18, call 7 (lead): session 16's first item, never run for want of an H100 pair: the
# H200-tuned normal-mode defaults A/B'd on 2 x H100 (GPUs 0,1 of a 4-GPU kind, which came as
# H100 in calls 4-6): default+p (layout_payload_claims 0: the payload in the chunks, before
# session 15), default:l64 (64 layout-only send blocks, default 96), default:m16 / default:m4
# (the combine's chunk, default 8 since session 15's ep26), two processes x 3 rounds, alternated.
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/s18-call7-h100-ab.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s18_call7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
nvidia-smi -L
export CUDA_VISIBLE_DEVICES=0,1
for i in 1 2; do
  timeout 100 "$bin/ep_bench" --ab default,default+p,default:l64,default:m16,default:m4 --ab-rounds 3 \
    --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --commit "${FP8MOE_COMMIT:-unknown}" \
    --out "$R/ab_$i.jsonl" > "$R/ab_$i.log" 2>&1
  el "ab $i rc=$?"
  grep -E "^# ab normal" "$R/ab_$i.log" | head -20
  pack
done
el done
