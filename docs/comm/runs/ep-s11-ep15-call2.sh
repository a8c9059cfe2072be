#!/usr/bin/env bash
# Session 11 (ep15), call 2: the FP8 records on 128-byte lines (a record_align_128), the second
# round (call 1 measured it once, and the tail parts p / q slower). Same binaries as call 1.
# Binaries: ep15's worktree (build-bundle: ep_bench, test_comm_gpu, moe_forward_bench, stripped),
# packed into /work/main/build-ep15/bins.tar.xz with this script as run.sh.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep15"], command="bash build-ep15/run.sh")
#   1. ep_bench A/B, two processes, 3 rounds each: default, default+a;
#   2. moe_forward_bench --record-align-128 at 64 experts and at the V3 shape (256 experts), one
#      process each, 5 rounds.
# One archive back: $OUT/ep15_call2.tgz.
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
pack() { tar czf "$O/ep15_call2.tgz" -C "$R" .; }
{ date -u; nvidia-smi -L; } > "$R/machine.txt" 2>&1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
AB=default,default+a
for i in 1 2; do  # two processes (PROCS=2 of scripts/comm/ep_ab_builds.sh)
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 150 "$bin/ep_bench" --ab "$AB" --ab-rounds 3 $COMMON --commit ep15 \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "1. ab $i rc=$?"; grep -E "^# ab " "$R/ab_$i.log"
  pack
done
for shape in e64 v3; do
  args=""; [[ $shape == e64 ]] && args="--experts 64"
  # shellcheck disable=SC2086 # args is a list of arguments
  timeout 150 "$bin/moe_forward_bench" $args --record-align-128 --rounds 5 --iters 30 \
    --commit ep15 --date "$d" --out "$R/moe_forward_$shape.jsonl" > "$R/moe_forward_$shape.log" 2>&1
  el "2. moe_forward_bench $shape rc=$?"; tail -7 "$R/moe_forward_$shape.log"
  pack
done
el done
