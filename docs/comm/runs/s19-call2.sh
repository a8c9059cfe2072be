#!/usr/bin/env bash
# Session 19, call 2: the receive grid of the layout-only dispatch. Call 1's stamps (2 x H100):
# the send blocks end at 92.2-96.3 us, the receive's last block reaches its layout at 98.0 and
# the call ends at 102.1: the receive grid is every SM (132 blocks), so the 64 blocks that find
# no free SM start only as the send blocks retire, and the last of them (which waits for the
# payload counters and acknowledges) pays a late start + the layout before it can end the call.
# With layout_payload_claims the receive copies no payload (metadata only), so the free SMs
# (132 - 64 send blocks = 68) should be enough. A/B (ep_bench :rN sets recv_blocks for the
# dispatch and the combine receive alike): default (132), :r68, :r34, :r100; two processes x 3
# rounds, with --graph 4 (graph rows per variant); then one traced eager round of :r68.
# Binaries: build-gr1 (ep_bench of main + gr1, the call-1 build).
# Call: run(kind="nvidia-h100-x2", carry=["build-gr1"], command="bash build-gr1/run.sh")
set -uo pipefail
bin=build-gr1/bin archive=build-gr1/bins.tar.xz name=s19_call2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1
for i in 1 2; do
  timeout 120 "$bin/ep_bench" --ab default,default:r68,default:r34,default:r100 --ab-rounds 3 \
    --graph 4 --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" \
    --out "$R/r_$i.jsonl" > "$R/r_$i.log" 2>&1
  el "1. r A/B $i rc=$?"
  grep -E "^# ab normal|MISMATCH" "$R/r_$i.log"
  grep -E "^# summary, graph" -A40 "$R/r_$i.log" | grep -E "^# graph|layout_only|combine " 
  pack
done
for v in default:r68 default; do
  FP8MOE_EP_TRACE=1 timeout 40 "$bin/ep_bench" --ab "$v" --ab-rounds 1 --blocks 64 --chunks 16 \
    --ll-blocks 64 --ll-chunks 4 --date "$d" --out "$R/trace_$v.jsonl" > "$R/trace_$v.log" 2>&1
  el "2. trace $v rc=$?"
  grep -E "^# ep_trace rank" "$R/trace_$v.log" | sed -n '3,4p'
  pack
done
el done
