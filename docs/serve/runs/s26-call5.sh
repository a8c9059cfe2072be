#!/usr/bin/env bash
# Session 26 call 5: after the duplicates' mend (the MoeLayerApi tests' graph replays in one
# Harness method; the benches' comma lists in bench_args.h): MoeLayerApi*, and both benches once
# at a small size (their flag parsing and tables).
# Call: run(kind="nvidia-h100-x2", carry=["build-s26/bins5.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s26-call5.sh", timeout_s=300)
set -uo pipefail
bin=build-s26/bin5 archive=build-s26/bins5.tar.xz name=s26_c5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/test_comm_moe_layer_api.log" 2>&1
el "1. test_comm_gpu MoeLayerApi* rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|graph replays" "$R/test_comm_moe_layer_api.log"
timeout 60 "$bin/moe_decode_bench" --shapes small-gpu --tokens 1,8 --iters 3 > "$R/bench_moe_decode.log" 2>&1
el "2. moe_decode_bench rc=$?"; cat "$R/bench_moe_decode.log"
timeout 90 "$bin/serve_bench" --devices 0,1 --low-latency-ab 1 --rounds 1 --configs small-gpu --batches 1,8 \
  > "$R/bench_ll_ab.log" 2>&1
el "3. serve_bench rc=$?"; cat "$R/bench_ll_ab.log"
gzip -f "$R"/test_*.log
pack
el done
