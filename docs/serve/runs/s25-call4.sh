#!/usr/bin/env bash
# Session 25 call 4 (4 GPUs): serving over 4 ranks (serve_bench --devices 0,1,2,3 against one
# GPU: the first 4-GPU serving rows), redundant experts at 4 and 2 GPUs (serve_bench --eplb with
# hot experts on the first GPUs: --skew), and test_serve_gpu with 4 GPUs visible.
# Call: run(kind="nvidia-h100-x4", carry=["build-s25/bins4.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call4.sh", timeout_s=420)
set -uo pipefail
bin=build-s25/bin4 archive=build-s25/bins4.tar.xz name=s25_c4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
nvidia-smi topo -m > "$R/topo.txt" 2>&1
timeout 150 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|\[ eplb \]" "$R/serve_tests.log" | head -12
pack
b() {  # b NAME ARGS...
  local n=$1
  shift
  timeout 150 "$bin/serve_bench" --date "$d" "$@" > "$R/bench_$n.log" 2>&1
  el "2. serve_bench $n rc=$?"; cat "$R/bench_$n.log"
  pack
}
b group4 --devices 0,1,2,3 --configs small-gpu,v3-slice --batches 8,32,64 --out "$R/serve_group4.jsonl"
for skew in 0 0.1 0.3; do
  b "eplb4_prefill_s$skew" --devices 0,1,2,3 --eplb 4 --skew "$skew" --configs v3-slice --batches 8,32 \
    --prompt 512 --new 16 --out "$R/serve_eplb.jsonl"
done
b eplb4_decode_s0.3 --devices 0,1,2,3 --eplb 4 --skew 0.3 --configs v3-slice,small-gpu --batches 64 \
  --prompt 128 --new 64 --out "$R/serve_eplb.jsonl"
b eplb2_prefill_s0.3 --devices 0,1 --eplb 4 --skew 0.3 --configs v3-slice --batches 8,32 \
  --prompt 512 --new 16 --out "$R/serve_eplb.jsonl"
el done
