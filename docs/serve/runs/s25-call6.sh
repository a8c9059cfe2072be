#!/usr/bin/env bash
# Session 25 call 6: prompts prefilled together (GeneratorOptions::prefill_batch) — test_serve_gpu
# (BatchedPrefillKeepsTheText: the same bits as one prompt at a time, greedy / sampled / MTP draft,
# device and host sampling; every other serving test with 2 GPUs visible), then serve_bench
# --prefill-batch 8 against one prompt a pass (one GPU), short and long prompts.
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins6.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call6.sh", timeout_s=420)
set -uo pipefail
bin=build-s25/bin6 archive=build-s25/bins6.tar.xz name=s25_c6
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 200 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|prefill passes|Expected|Which is" "$R/serve_tests.log" | head -20
pack
export CUDA_VISIBLE_DEVICES=0
b() {  # b NAME ARGS...
  local n=$1
  shift
  timeout 150 "$bin/serve_bench" --date "$d" --out "$R/serve_prefill.jsonl" "$@" > "$R/bench_$n.log" 2>&1
  el "2. serve_bench $n rc=$?"; cat "$R/bench_$n.log"
  pack
}
b p128 --prefill-batch 8 --configs small-gpu,v3-slice --batches 8,32,64 --prompt 128 --new 16
b p512 --prefill-batch 8 --configs small-gpu,v3-slice --batches 8,32 --prompt 512 --new 16
el done
