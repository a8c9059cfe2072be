#!/usr/bin/env bash
# Session 16, tdup: the two low-latency acknowledgement test files (ll1
# device_ep_ll_s15_gpu_test.cu, ll2 device_ep_ll_s16_gpu_test.cu) on one shared harness
# (tests/comm/ll_ack_test_util.h). Test-only change: no library, kernel or bench change. Binary:
# branch tdup (BUILD_INFO.txt), `cmake --build build-bundle -j1 --target test_comm_gpu`, stripped
# and xz-packed into build-tdup/bins.tar.xz.
# Call: run(kind="nvidia-h100-x2", carry=["build-tdup"], command="bash build-tdup/run.sh")
#   1. the test list (must equal build-tdup/tests_before.txt: the same 20 names);
#   2. every test of the two suites on 2 GPUs, under a timeout.
# One archive back: $OUT/tdup_s16.tgz. Expected ~1.5 min wall (+ a cold start).
set -uo pipefail
bin=build-tdup/bin archive=build-tdup/bins.tar.xz name=tdup_s16
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-tdup/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1
F='LowLatencyDeferAck.*:LowLatencyNextKernelAck.*'

# 1. The names.
"$bin/test_comm_gpu" --gtest_filter="$F" --gtest_list_tests > "$R/list.txt" 2>&1
diff build-tdup/tests_before.txt "$R/list.txt" > "$R/list.diff" 2>&1
drc=$?
el "1. list: $(grep -c '^  ' "$R/list.txt") tests, diff rc=$drc (0: the same names)"
pack

# 2. Tests (rc 77: skipped, no GPU).
timeout 200 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
rc=$?
el "2. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|tests from" "$R/tests.log" | head -40
pack
el "done"
