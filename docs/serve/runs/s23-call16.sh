#!/usr/bin/env bash
# Session 23 call 16: test_serve_gpu after its set-up and batch-invariance check became helpers
# (options(), expect_batch_invariant()).
# Call: run(carry=["build-s23/bins16.tar.xz", "build-bundle/lib"], command="bash docs/serve/runs/s23-call16.sh", timeout_s=200)
set -uo pipefail
bin=build-s23/bin16 archive=build-s23/bins16.tar.xz name=s23_c16
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/serve_tests.log" | head -8
pack
el done
