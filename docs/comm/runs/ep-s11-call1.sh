#!/usr/bin/env bash
# Session 11, first EP call (prepared at the end of session 10, not run). Binaries: the bundle of
# `bash scripts/gpu_bundle.sh` at session 11's head (build-bundle/bins.tar.xz) and session 10's
# final ep_bench (build-regress/ep_bench_s10, built before the benches' gated timing moved into
# bench/gpu/gated_timing.cuh).
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz","build-regress/ep_bench_s10"],
#           command="bash docs/comm/runs/ep-s11-call1.sh")   (~3 min wall expected)
#   1. ep_bench: session 10's binary against this one, defaults, two processes each (the shared
#      gated timing must read as before: within the A/B's spread);
#   2. FP8MOE_EP_TRACE=1 stamps of the default and the layout-only dispatch (where the
#      layout-only send's ~114 us go: plan, notify, first payload, last chunk, tail);
#   3. moe_forward_bench at the V3 shape (256 experts), at 64 experts (32 local: ~4x the rows per
#      expert, a compute-bound expert GEMM as at larger EP) and at 8192 tokens per rank.
# One archive back: $OUT/ep_s11_call1.tgz.
set -uo pipefail
cd "$(dirname "$0")/../../.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
bin=build-bundle/bin
[[ -x $bin/ep_bench ]] || { mkdir -p $bin && tar xJf build-bundle/bins.tar.xz -C $bin; }
O=${OUT:-/tmp/ep_s11}; R=$(mktemp -d); mkdir -p "$O"
d=$(date -u +%F)
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
pack() { tar czf "$O/ep_s11_call1.tgz" -C "$R" .; }
{ date -u; nvidia-smi -L; } > "$R/machine.txt" 2>&1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"

OUT=$R/ab BUILDS="s10=build-regress/ep_bench_s10 now=$bin/ep_bench" AB=default PROCS=2 GPUS=0,1 \
  bash scripts/comm/ep_ab_builds.sh 2>&1 | grep -E "rc=|normal +(dispatch|combine) "
el "1. builds A/B done"; pack

# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/ep_bench" --ab default --ab-rounds 1 \
  $COMMON --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "2. stamps rc=$?"; grep -E "^# ab normal" "$R/trace.log" | head; pack

for args in "" "--experts 64" "--tokens 8192"; do
  name=$(echo "v3 $args" | tr -d '-' | tr ' ' '_')
  # shellcheck disable=SC2086 # args is a list of arguments
  CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/moe_forward_bench" $args --rounds 5 --iters 30 \
    --out "$R/moe_forward_$name.jsonl" --date "$d" > "$R/moe_forward_$name.log" 2>&1
  el "3. moe_forward_bench $args rc=$?"; grep -v "^round" "$R/moe_forward_$name.log" | tail -7
  pack
done
el "done"
