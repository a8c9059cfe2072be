#!/usr/bin/env bash
# Session 23 call 5: decoding steps as CUDA graphs — test_serve_gpu (graphs on and off give the
# same text), serve_bench with the graph and eager step times.
# Call: run(carry=["build-s23/bins5.tar.xz"], command="bash docs/serve/runs/s23-call5.sh", timeout_s=300)
set -uo pipefail
bin=build-s23/bin5 archive=build-s23/bins5.tar.xz name=s23_c5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|outside|Expected|Which is" "$R/serve_tests.log" | cut -c1-200 | head -30
pack
timeout 200 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,8,32,64 --prompt 128 --new 64 \
  --date "$d" --commit "${FP8MOE_COMMIT:-s23-c5}" --out "$R/serve.jsonl" > "$R/serve_bench.log" 2>&1
el "2. serve_bench rc=$?"; cat "$R/serve_bench.log"
pack
el done
