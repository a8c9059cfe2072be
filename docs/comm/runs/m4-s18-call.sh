#!/usr/bin/env bash
# Prepared in session 18 for session 19 (not run): the combine's chunk 8 -> 4 (patch
# docs/comm/runs/m4-s18-combine-chunk4.patch; 2 x H100 read 4 against 8 at -1.2..-1.6 % in six
# processes of three calls, session 15 read 4 = 8 on H200 on its kernels). Steps here: `git apply
# docs/comm/runs/m4-s18-combine-chunk4.patch`, `JOBS=2 bash scripts/gpu_bundle.sh`, commit.
# Call (ask nvidia-h100-x2; it has come as H200 and as H100 — either reads):
#   run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"], command="FP8MOE_COMMIT=<sha> bash docs/comm/runs/m4-s18-call.sh")
#   1. test_comm_gpu whole with the new default (scripts/device_full_validation.sh phase 1, ~420 s);
#   2. ep_bench --ab default,default:m8 (8 = the old default) two processes x 3 rounds on GPUs 0,1.
# Lands if the tests pass and the combine is not slower than :m8 on the card that came (H200: within
# +-0.5 % is enough, as H100 has its gain).
set -uo pipefail
FULL_PHASES=1 FULL_TEST_SHARD=0/1 FULL_TEST_TIMEOUT=480 bash scripts/device_full_validation.sh
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=m4_ab
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
nvidia-smi -L
export CUDA_VISIBLE_DEVICES=0,1
for i in 1 2; do
  timeout 60 "$bin/ep_bench" --ab default,default:m8 --ab-rounds 3 --blocks 64 --chunks 16 \
    --ll-blocks 64 --ll-chunks 4 --date "$d" --commit "${FP8MOE_COMMIT:-unknown}" \
    --out "$R/ab_$i.jsonl" > "$R/ab_$i.log" 2>&1
  el "ab $i rc=$?"
  grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
