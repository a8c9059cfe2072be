#!/usr/bin/env bash
# Session 23 call 3: test_serve_gpu with per-row logits (dense-only and MoE configs) and the
# GPU's own prefill-vs-steps consistency.
# Call: run(carry=["build-s23/bins3.tar.xz"], command="bash docs/kernels/runs/s23-call3.sh", timeout_s=200)
set -uo pipefail
bin=build-s23/bin3 archive=build-s23/bins3.tar.xz name=s23_c3
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 150 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|serve \]" "$R/serve_tests.log" | cut -c1-200 | head -60
pack
el done
