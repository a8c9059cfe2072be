#!/usr/bin/env bash
# Session 25 call 13: GeneratorOptions::tensor_core_products (default off: the CUDA-core products,
# as call 10) — test_serve_gpu on the default, then serve_bench off / on on the same GPU: the
# decoding table (batch 1, 16, 64) and 8 prompts of 512 a prefill pass.
# Call: run(kind="nvidia-h100-x1", carry=["build-s25/bins13.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call13.sh", timeout_s=200)
set -uo pipefail
bin=build-s25/bin13 archive=build-s25/bins13.tar.xz name=s25_c13
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 60 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "1. test_serve_gpu rc=$?"; grep -hE "^\[  (PASSED|FAILED)  \]|Failure|SKIPPED \] [0-9]" "$R/test_serve_gpu.log"
for tc in off on; do
  timeout 60 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,16,64 --tensor-core-products $tc \
    --date "$d" --out "$R/serve_$tc.jsonl" > "$R/bench_decode_$tc.log" 2>&1
  el "2. serve_bench tc $tc rc=$?"; cat "$R/bench_decode_$tc.log"
  timeout 60 "$bin/serve_bench" --prefill-batch 8 --configs small-gpu,v3-slice --batches 32 --prompt 512 --new 16 \
    --tensor-core-products $tc --date "$d" --out "$R/serve_prefill_$tc.jsonl" > "$R/bench_p512_$tc.log" 2>&1
  el "3. serve_bench --prefill-batch 8 tc $tc rc=$?"; cat "$R/bench_p512_$tc.log"
  pack
done
gzip -f "$R"/test_*.log
pack
