#!/usr/bin/env bash
# Session 11 (ep14), call 1: the layout-only dispatch's source-region send with session 11's
# options (o layout_release_only, n layout_notify_block, m layout_metadata_first).
# Binaries: ep14's worktree (build-bundle: ep_bench, test_comm_gpu, stripped), copied to
# /work/main/build-ep14/ with this script as run.sh.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep14"], command="bash build-ep14/run.sh")
#   1. tests: every combination of the options over every case (source regions: direct rows off),
#      and the gathered path (layout-only group with o+n+m) against the expanded one;
#   2. ep_bench A/B, one process, 2 rounds: default, o, on, om, onm, onm:b96, onm:c32;
#   3. the stamps (FP8MOE_EP_TRACE=1) of default, o, onm (one round).
# One archive back: $OUT/ep14_call1.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
export CUDA_VISIBLE_DEVICES=0,1
bin=build-ep14
O=${OUT:-/tmp/ep14}; R=$(mktemp -d); mkdir -p "$O"
d=$(date -u +%F)
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
pack() { tar czf "$O/ep14_call1.tgz" -C "$R" .; }
{ date -u; nvidia-smi -L; } > "$R/machine.txt" 2>&1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
F='NvlinkTest.Session11LayoutSendOptionsMatchReference:MoeLayerGpu.GatheredPathEqualsExpandedPath*'
timeout 240 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
el "1. test_comm_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|^\[       OK \]" "$R/tests.log" | head -20
pack
AB=default,default+o,default+on,default+om,default+onm,default+onm:b96,default+onm:c32
# shellcheck disable=SC2086 # COMMON is a list of arguments
timeout 200 "$bin/ep_bench" --ab "$AB" --ab-rounds 2 $COMMON --commit ep14 --out "$R/ab.jsonl" \
  --date "$d" > "$R/ab.log" 2>&1
el "2. ab rc=$?"; grep -E "^# ab normal" "$R/ab.log"
pack
# shellcheck disable=SC2086
FP8MOE_EP_TRACE=1 timeout 120 "$bin/ep_bench" --ab default,default+o,default+onm --ab-rounds 1 \
  $COMMON --commit ep14 --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "3. trace rc=$?"; grep -E "ep_trace rank|^fp8moe +normal +dispatch_layout" "$R/trace.log" | head -20
pack
el done
