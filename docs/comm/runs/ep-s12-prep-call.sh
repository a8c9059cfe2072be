#!/usr/bin/env bash
# Session 12, ep16's prepared call (made at the end of session 11, not run): the layout-only
# send by per-warp claims (DeviceEpOptions::layout_warp_claims, ep_bench letter w; code:
# docs/comm/runs/ep-s12-prep-warp-claims.patch on main 174dedc). Binaries: ep16's worktree
# (build-bundle: test_comm_gpu, ep_bench; stripped), packed into /work/main/build-ep16/bins.tar.xz
# with this script as build-ep16/run.sh (BUILD_INFO.txt there names the source).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep16"], command="bash build-ep16/run.sh")
#   (~2.5 min wall expected)
#   1. test_comm_gpu: NvlinkTest.Session11LateWarpClaimsMatchReference and
#      MoeLayerGpu.GatheredPathEqualsExpandedPathSession11LateWarpClaims (bit for bit);
#   2. ep_bench --ab default,default+w --ab-rounds 3, two processes;
#   3. the stamps (FP8MOE_EP_TRACE=1) of default and default+w, one round.
# Predictions: docs/comm/README.md, "Session 11 late: per-warp claims in the layout-only send,
# prepared (ep16)". One archive back: $OUT/ep16_prep.tgz.
set -uo pipefail
# The prologue from the repository root, whether this runs as docs/comm/runs/... or as a copy
# in build-ep16/.
root=$(cd "$(dirname "$0")" && pwd)
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=build-ep16/bin archive=build-ep16/bins.tar.xz name=ep16_prep
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=0,1
cp build-ep16/BUILD_INFO.txt "$R/" 2>/dev/null
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
F='NvlinkTest.Session11LateWarpClaimsMatchReference:MoeLayerGpu.GatheredPathEqualsExpandedPathSession11LateWarpClaims'
timeout 180 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
el "1. test_comm_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|^\[       OK \]" "$R/tests.log" | head -20
pack
AB=default,default+w
for i in 1 2; do  # two processes (PROCS=2 of scripts/comm/ep_ab_builds.sh)
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 150 "$bin/ep_bench" --ab "$AB" --ab-rounds 3 $COMMON --commit ep16 \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 100 "$bin/ep_bench" --ab "$AB" --ab-rounds 1 $COMMON --commit ep16 \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "3. stamps rc=$?"; grep -E "ep_trace rank|^fp8moe +normal +dispatch_layout" "$R/trace.log" | head -20
gzip -f "$R/tests.log"
pack
el "done"
