#!/usr/bin/env bash
# Session 14 (helper ep24): the normal sends' destination order at 4 ranks, send_rotate (ep_bench
# letter z) against the defaults, and the second 4-rank call of ep23's ll_dispatch_rotate R
# (docs/comm/README.md "Session 14: the normal sends' destination order at 4 ranks (ep24)"). Runs
# the binaries built in /work/ep24 (main c8089a3 + ep24's diff; build-bundle configure of
# scripts/gpu_bundle.sh, static libstdc++, stripped, xz) copied into the ignored folder build-ep24/
# with this script as run.sh.
# Call: run(kind="nvidia-h100-x4", carry=["build-ep24"], command="bash build-ep24/run.sh")
# 1. the *Session14SendRotate* tests and the combine backward's SendRotate test on all 4 GPUs;
# 2. ep_bench --ab default,default+z (3 rounds, 64 send blocks, chunks 16) at 4 ranks (GPUs 0-3);
# 3. the LL A/B new,newR (6 rounds) at 4 ranks, as runs/ep-s14-ep23-call.sh;
# 4. step 2 at 2 ranks (GPUs 0,1), then step 3 at 2 ranks;
# 5. step 2 at 4 ranks with --sorted-topk (each token's ids ascending, as the router emits them:
#    the direct rows' default order is then ascending ranks).
# A failed test times the defaults only (default, new). One archive back: $OUT/ep24_s14.tgz.
# Expected ~110 s wall (+ a cold start).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bin=build-ep24/bin archive=build-ep24/bins.tar.xz name=ep24_s14
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ep24/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -6 "$R/machine.txt"

# 1. Tests (all GPUs).
F='NvlinkTest.Session14SendRotate*:CombineBackwardGpuTest.SendRotateMatchesReference'
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 90 "$bin/test_comm_gpu" --gtest_filter="$F" \
  > "$R/tests.log" 2>&1
rc=$?
el "tests rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -30
pack
ab=default,default+z ll=new,newR
[[ $rc -eq 0 ]] || { ab=default; ll=new; }

normal_ab() {  # gpus tag [extra flags]
  local gpus=$1 tag=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout 50 "$bin/ep_bench" --ab "$ab" --ab-rounds 3 --blocks 64 \
    --chunks 16 --ll-blocks 64 --ll-chunks 4 "$@" --out "$R/ab_$tag.jsonl" --date "$d" \
    > "$R/ab_$tag.log" 2>&1
  el "ab $tag rc=$?"
  grep -E "^# ab|MISMATCH|mismatch" "$R/ab_$tag.log" | head -14
  pack
}
ll_ab() {  # gpus tag
  CUDA_VISIBLE_DEVICES=$1 timeout 35 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 \
    --iters 30 --ll-variants "$ll" --out "$R/ll_$2.jsonl" --date "$d" > "$R/ll_$2.log" 2>&1
  el "ll $2 rc=$?"
  grep -E "^# ab|MISMATCH|mismatch" "$R/ll_$2.log" | head -8
  pack
}
normal_ab 0,1,2,3 x4
ll_ab 0,1,2,3 x4
normal_ab 0,1 x2
ll_ab 0,1 x2
normal_ab 0,1,2,3 x4_sorted --sorted-topk
el "done"
