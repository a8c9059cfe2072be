#!/usr/bin/env bash
# Session 26 call 6 (run after call 7): four GPUs — one MoE layer's decoding step at 4 ranks
# (moe_decode_bench of call 5's build: normal vs low-latency, every visible GPU a rank) and
# serving over 4 GPUs with the low-latency decoding exchange against the normal one (serve_bench
# --low-latency-ab of call 7's build, the session's final code); both in bins6.
# Call: run(kind="nvidia-h100-x4", carry=["build-s26/bins6.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s26-call6.sh", timeout_s=200)
set -uo pipefail
bin=build-s26/bin6 archive=build-s26/bins6.tar.xz name=s26_c6
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 80 "$bin/moe_decode_bench" --shapes small-gpu,v3 --tokens 1,64 --iters 3 --date "$d" \
  --out "$R/moe_decode_x4.jsonl" > "$R/bench_moe_decode_x4.log" 2>&1
el "1. moe_decode_bench (4 ranks) rc=$?"; cat "$R/bench_moe_decode_x4.log"
pack
timeout 100 "$bin/serve_bench" --devices 0,1,2,3 --low-latency-ab 1 --rounds 2 \
  --configs small-gpu,v3-slice --batches 1,64 --date "$d" --out "$R/serve_ll_ab_x4.jsonl" \
  > "$R/bench_ll_ab_x4.log" 2>&1
el "2. serve_bench --low-latency-ab (4 GPUs) rc=$?"; cat "$R/bench_ll_ab_x4.log"
pack
el done
