#!/usr/bin/env bash
# Session 23 call 12: the GPU model and serve tests on the shared test config (tests/support/small_gpu_config.h)
# the same JSON as before, moved): test_model_gpu, test_serve_gpu.
# Call: run(carry=["build-s23/bins12.tar.xz", "build-bundle/lib"], command="bash docs/kernels/runs/s23-call12.sh", timeout_s=400)
set -uo pipefail
bin=build-s23/bin12 archive=build-s23/bins12.tar.xz name=s23_c12
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
for t in test_model_gpu test_serve_gpu; do
  tname=${t%% *}
  # shellcheck disable=SC2086
  timeout 300 "$bin/"$t > "$R/$tname.log" 2>&1
  el "$tname rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/$tname.log" | head -8
done
pack
el done
