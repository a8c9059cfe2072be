#!/usr/bin/env bash
# Prepared at the end of session 12 (not run): the low-latency kernels' stamps at 4 ranks. At 4 x
# H200 (session 12, docs/results/ep-2026-11-26-4xh200-s12.md) the LL dispatch reads 32.3 us against
# NCCL's 23.8 (0.74x) and 23.0 against 17.3 at 2 ranks; the stamps (FP8MOE_EP_LL_TRACE=1,
# docs/comm/README.md "Session 9: low latency (ep11)") were only ever taken at 2 ranks. This call
# takes them at 2 and at 4 ranks in one process each, so the steps that grow with the rank count
# (plan, notify round trips, the receive's per-source layout loads) show.
# Binaries: the bundle of `bash scripts/gpu_bundle.sh` at the session's head.
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s13-x4-ll-stamps.sh")   (~1.5 min wall + cold start)
# One archive back: $OUT/ep_s13_ll_stamps.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ep_s13_ll_stamps
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for gpus in 0,1 0,1,2,3; do
  n=$(tr -cd , <<< "$gpus" | wc -c); n=$((n + 1))
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  CUDA_VISIBLE_DEVICES=$gpus FP8MOE_EP_LL_TRACE=1 timeout 150 "$bin/ep_bench" --ab default \
    --ab-rounds 3 $COMMON --out "$R/ll_trace_x$n.jsonl" --date "$d" > "$R/ll_trace_x$n.log" 2>&1
  el "ranks $n rc=$?"; grep -E "^# ab low_latency|ll_trace" "$R/ll_trace_x$n.log" | head -12
  pack
done
el "done"
