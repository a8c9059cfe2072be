#!/usr/bin/env bash
# Session 11 (ep15), call 1: the layout-only send's last wave in parts (p layout_tail_pieces 2, q 4)
# and the FP8 records on 128-byte lines (a record_align_128), against the defaults (o, d, 96 send
# blocks since 2d55ba7).
# Binaries: ep15's worktree (build-bundle: ep_bench, test_comm_gpu, moe_forward_bench, stripped),
# packed into /work/main/build-ep15/bins.tar.xz with this script as run.sh.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep15"], command="bash build-ep15/run.sh")
#   1. tests: the tail parts and 128-byte records over every case (two rounds each), the gathered
#      path with both against the expanded one;
#   2. ep_bench A/B, two processes, 3 rounds each: default, default+p, default+q, default+a,
#      default+pa;
#   3. moe_forward_bench --experts 64 --record-align-128 (gathered at 7392 and at 7424 bytes, the
#      expanded anchor, one process, 5 rounds);
#   4. the stamps (FP8MOE_EP_TRACE=1) of default, default+p, default+q (one round).
# One archive back: $OUT/ep15_call1.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
export CUDA_VISIBLE_DEVICES=0,1
bin=build-ep15
[[ -x $bin/ep_bench ]] || tar xJf "$bin/bins.tar.xz" -C "$bin"
O=${OUT:-/tmp/ep15}; R=$(mktemp -d); mkdir -p "$O"
d=$(date -u +%F)
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
pack() { tar czf "$O/ep15_call1.tgz" -C "$R" .; }
{ date -u; nvidia-smi -L; } > "$R/machine.txt" 2>&1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
F='NvlinkTest.Session11TailPiecesAndAlignedRecordsMatchReference:MoeLayerGpu.GatheredPathEqualsExpandedPathSession11*'
timeout 150 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
el "1. test_comm_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|^\[       OK \]" "$R/tests.log" | head -20
pack
AB=default,default+p,default+q,default+a,default+pa
for i in 1 2; do  # two processes (PROCS=2 of scripts/comm/ep_ab_builds.sh)
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 200 "$bin/ep_bench" --ab "$AB" --ab-rounds 3 $COMMON --commit ep15 \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
timeout 150 "$bin/moe_forward_bench" --experts 64 --record-align-128 --rounds 5 --iters 30 \
  --commit ep15 --date "$d" --out "$R/moe_forward_e64.jsonl" > "$R/moe_forward_e64.log" 2>&1
el "3. moe_forward_bench rc=$?"; tail -8 "$R/moe_forward_e64.log"
pack
# shellcheck disable=SC2086
FP8MOE_EP_TRACE=1 timeout 100 "$bin/ep_bench" --ab default,default+p,default+q --ab-rounds 1 \
  $COMMON --commit ep15 --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "4. trace rc=$?"; grep -E "ep_trace rank|^fp8moe +normal +dispatch_layout" "$R/trace.log" | head -20
pack
el done
