#!/usr/bin/env bash
# Session 18, call 6 (lead): ep_bench's new combine_tokens row (one BF16 row per received token
# back to its source, summed there: the bytes NCCL's combine anchor moves) beside the existing
# rows, at 2 ranks (GPUs 0,1) and at every GPU of the machine, defaults.
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/s18-call6-combine-tokens.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=s18_call6
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
n=$(nvidia-smi -L | grep -c '^GPU')
nvidia-smi -L
COMMON=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --commit "${FP8MOE_COMMIT:-unknown}")
for g in 2 "$n"; do
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((g - 1))) timeout 120 "$bin/ep_bench" "${COMMON[@]}" \
    --out "$R/defaults_x$g.jsonl" > "$R/defaults_x$g.log" 2>&1
  el "defaults x$g rc=$?"
  grep -A9 "^# summary" "$R/defaults_x$g.log"
  pack
  ((n == 2)) && break
done
el done
