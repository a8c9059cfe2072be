#!/usr/bin/env bash
# Session 20, s20-mb: MoeLayerGpu's backward (include/fp8moe/comm/moe_layer_gpu.h: combine_backward
# -> experts_backward -> dispatch_backward) against moe_layer_backward_reference, with the
# forward's MoeLayerApi tests. Predictions: docs/moe/README.md, "MoeLayerGpu backward (s20-mb)".
# Binary: build-mb/bins.tar.xz (test_comm_gpu, stripped; BUILD_INFO.txt). Nothing timed.
# Call: run(kind="nvidia-h100-x2", carry=["build-mb"], command="bash build-mb/run.sh",
#           timeout_s=200)
#   1. test_comm_gpu --gtest_filter='MoeLayerApi*' on 2 GPUs (timeout 120): the forward's 3 tests
#      and MoeLayerApiBackward.{MatchesCpuAndGatheredEqualsExpanded, BadOrderThrows};
#   2. the same with 2 ranks sharing GPU 0 (phase by phase; the graph test skipped) (timeout 70),
#      only if 1 took < 110 s.
# One archive back: $OUT/mb_s20.tgz (tests_2gpu.log, tests_1gpu.log, machine.txt).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${MB_BIN:-build-mb/bin} archive=build-mb/bins.tar.xz name=mb_s20
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
cp build-mb/BUILD_INFO.txt "$R/" 2> /dev/null
head -4 "$R/machine.txt"

# 1. The tests on 2 GPUs.
F='MoeLayerApi*'
CUDA_VISIBLE_DEVICES=0,1 timeout 120 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests_2gpu.log" 2>&1
rc=$?
el "1. MoeLayerApi*, 2 GPUs rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|^\[  SKIPPED|round|replays|seed|throw" "$R/tests_2gpu.log" | cut -c1-260 | head -40
pack

# 2. 2 ranks sharing GPU 0 (the phase-by-phase path).
if (( $(date +%s) - t0 < 110 )); then
  CUDA_VISIBLE_DEVICES=0 timeout 70 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests_1gpu.log" 2>&1
  rc1=$?
  el "2. MoeLayerApi*, 2 ranks on GPU 0 rc=$rc1"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|^\[  SKIPPED|round|throw" "$R/tests_1gpu.log" | cut -c1-260 | head -30
  pack
  (( rc == 0 )) && rc=$rc1
else
  el "2. skipped (time)"
fi
el "done (rc $rc)"
exit "$rc"
