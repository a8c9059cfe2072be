#!/usr/bin/env bash
# Session 19 late, s19-ml (prepared for session 20): MoeLayerGpu — one routed + shared MoE FFN
# layer across EP ranks as a library call (include/fp8moe/comm/moe_layer_gpu.h): dispatch ->
# ExpertFfnGpu on the received rows (gathered from the records or on the expanded rows) + the
# shared expert (ExpertFfnGpu, one group) -> combine -> y = bf16(routed + shared). Predictions:
# docs/moe/README.md, "MoeLayerGpu (s19-ml)". Binary: build-ml/bins.tar.xz (test_comm_gpu,
# stripped; BUILD_INFO.txt). Nothing timed.
# Call: run(kind="nvidia-h100-x2", carry=["build-ml"], command="bash build-ml/run.sh",
#           timeout_s=200)
#   1. test_comm_gpu --gtest_filter='MoeLayerApi*' on 2 GPUs (timeout 150): the forward against
#      moe_layer_reference over three rounds, gathered == expanded, graph replay, bad shapes;
#   2. the same on one GPU (2 ranks sharing GPU 0, phase by phase; graph test skipped) (timeout 60)
#      only if 1 took < 90 s.
# One archive back: $OUT/ml_s20.tgz (tests_2gpu.log, tests_1gpu.log, machine.txt). ~30-60 s wall
# expected (CPU references dominate), < 200 s worst case.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${ML_BIN:-build-ml/bin} archive=build-ml/bins.tar.xz name=ml_s20
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
cp build-ml/BUILD_INFO.txt "$R/" 2> /dev/null
head -4 "$R/machine.txt"

# 1. The tests on 2 GPUs.
F='MoeLayerApi*'
CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests_2gpu.log" 2>&1
rc=$?
el "1. MoeLayerApi, 2 GPUs rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|^\[  SKIPPED|round|replays|seed" "$R/tests_2gpu.log" | cut -c1-200 | head -40
pack

# 2. 2 ranks sharing GPU 0 (the phase-by-phase path).
if (( $(date +%s) - t0 < 90 )); then
  CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests_1gpu.log" 2>&1
  rc1=$?
  el "2. MoeLayerApi, 2 ranks on GPU 0 rc=$rc1"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|^\[  SKIPPED|round" "$R/tests_1gpu.log" | cut -c1-200 | head -30
  pack
else
  el "2. skipped (time)"
fi
el "done (rc $rc)"
exit "$rc"
