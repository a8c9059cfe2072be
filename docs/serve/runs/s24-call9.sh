#!/usr/bin/env bash
# Session 24 call 9: test_serve_gpu after ServeEqualsGenerate's source was fixed (one GPU).
# Call: run(kind="nvidia-h100-x1", carry=["build-s24/bins9.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s24-call9.sh", timeout_s=90)
set -uo pipefail
bin=build-s24/bin9 archive=build-s24/bins9.tar.xz name=s24_c9
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 60 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "test_serve_gpu rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|serve\(\)|SKIPPED \] [0-9]" "$R/serve_tests.log" | head -12
pack
