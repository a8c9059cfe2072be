#!/usr/bin/env bash
# Session 24 call 6: prefill/decode disaggregation (serve/disaggregated_gpu.h): test_serve_gpu on
# two GPUs (the handoff on one GPU, DisaggregatedGeneratorGpu on two, the group, everything
# before), then serve_bench --disaggregate 0,1: one GPU vs the DP/EP group vs prefill on GPU 0 and
# decoding on GPU 1, on a queue of 128 prompts of 512 tokens (64 new each).
# Call: run(kind="nvidia-h100-x2", carry=["build-s24/bins6.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s24-call6.sh", timeout_s=400)
set -uo pipefail
bin=build-s24/bin6 archive=build-s24/bins6.tar.xz name=s24_c6
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 150 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|\[ disagg \]|\[ group \]" "$R/serve_tests.log" | head -24
pack
timeout 200 "$bin/serve_bench" --disaggregate 0,1 --configs small-gpu,v3-slice --prompt 512 --new 64 \
  --batches 16,64 --requests 128 --out "$R/serve_disaggregated.jsonl" --date "$d" > "$R/bench.log" 2>&1
el "2. serve_bench --disaggregate 0,1 rc=$?"; cat "$R/bench.log"
pack
el done
