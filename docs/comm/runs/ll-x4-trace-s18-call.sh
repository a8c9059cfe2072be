#!/usr/bin/env bash
# Prepared in session 18 for session 19 (not run): why the low-latency ids block (I, the default
# since session 18) gains nothing event-timed at 4 ranks (4 x H100, call 4: 27.1 against V's 27.2
# us; -1.2 us a graph round) while it gains 1.3-2.0 us at 2. One traced round of new (I), newB (V)
# and newS at 4 ranks (FP8MOE_EP_LL_TRACE=1: the phase stamps of docs/comm/README.md "Session 17
# late: ... (ll5)") and the A/B in two processes. Read: if "ids-seen" comes after ~5 us at 4
# ranks the ids block's stores to 3 peers queue behind the payload (then: one ids block per
# destination); if "data" is early and the end still payload end + ~4, the payload's rate to 3
# peers sets the end and the ids are off the path already.
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"], command="bash docs/comm/runs/ll-x4-trace-s18-call.sh")
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ll_x4_trace
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
n=$(nvidia-smi -L | grep -c '^GPU')
export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1)))
nvidia-smi -L
for i in 1 2; do
  timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
    --ll-variants new,newB,newS --out "$R/ll_$i.jsonl" --date "$d" > "$R/ll_$i.log" 2>&1
  el "ll $i rc=$?"
  grep -E "^# ab_ll" "$R/ll_$i.log"
  pack
done
FP8MOE_EP_LL_TRACE=1 timeout 40 "$bin/ep_bench" --ab-ll 1 --ll-blocks 64 --ll-chunks 4 --iters 5 \
  --ll-variants new,newB,newS --out "$R/ll_trace.jsonl" --date "$d" > "$R/ll_trace.log" 2>&1
el "trace rc=$?"
grep -E "^ll_trace" "$R/ll_trace.log" | head -60
pack
