#!/usr/bin/env bash
# Session 26 call 3: comm::MaskedExperts (the experts' GEMMs on the masked layout as the masked
# GEMMs or the grouped-contiguous ones over its row index; kAuto by experts a rank; the decoder's
# capacity rounded up to 128): MoeLayerApi* (contiguous == masked bit for bit), test_serve_gpu,
# moe_decode_bench with both GEMM forms, serve_bench --low-latency-ab as calls 1 and 2.
# Call: run(kind="nvidia-h100-x2", carry=["build-s26/bins3.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s26-call3.sh", timeout_s=600)
set -uo pipefail
bin=build-s26/bin3 archive=build-s26/bins3.tar.xz name=s26_c3
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|values differ|low-latency|low_latency|graph replays|SKIPPED" "$1" | head -40; }
timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/test_comm_moe_layer_api.log" 2>&1
el "2. test_comm_gpu MoeLayerApi* rc=$?"; summary "$R/test_comm_moe_layer_api.log"
pack
timeout 240 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "3. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
pack
timeout 200 "$bin/moe_decode_bench" --date "$d" --out "$R/moe_decode.jsonl" > "$R/bench_moe_decode.log" 2>&1
el "4. moe_decode_bench rc=$?"; cat "$R/bench_moe_decode.log"
pack
timeout 200 "$bin/serve_bench" --devices 0,1 --low-latency-ab 1 --rounds 3 --configs small-gpu,v3-slice \
  --batches 1,8,32,64 --date "$d" --out "$R/serve_ll_ab.jsonl" > "$R/bench_ll_ab.log" 2>&1
el "5. serve_bench --low-latency-ab rc=$?"; cat "$R/bench_ll_ab.log"
gzip -f "$R"/test_*.log
pack
el done
