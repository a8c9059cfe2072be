#!/usr/bin/env bash
# Session 14 late (helper test1), for session 15: the tests of the guide's gaps
# (tests/comm/device_ep_gaps_gpu_test.cu, docs/comm/runs/ep-s14-test1-gaps.patch; docs/comm/README.md
# "Session 14 late: tests for the guide's gaps, prepared (test1)"). Runs test_comm_gpu built in
# /work/test1 (main 197245e + that one new file; build-bundle configure of scripts/gpu_bundle.sh,
# static libstdc++, stripped, xz) copied into the ignored folder build-test1/ with this script.
# Call: run(kind="nvidia-h100-x2", carry=["build-test1"], command="bash build-test1/run.sh")
# Each of the five EpGaps tests alone on GPUs 0,1 under its own timeout, so that a hang (the NCCL
# graphs are the likeliest) ends only its own step; the guide's model test beside them
# (MoeLayerGpu.DispatchGroupedGemmCombine*) as a control; last the NCCL graph driven from one
# thread (NCCL's guide warns that it may block in cudaGraphLaunch). One archive back:
# $OUT/test1_s14.tgz. Expected: all pass, ~60-90 s wall in all (+ a cold start); worst case
# (every step timed out) 480 s.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bin=build-test1/bin archive=build-test1/bins.tar.xz name=test1_s14
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-test1/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -6 "$R/machine.txt"

step() {  # tag timeout filter
  CUDA_VISIBLE_DEVICES=0,1 timeout "$2" "$bin/test_comm_gpu" --gtest_filter="$3" \
    > "$R/$1.log" 2>&1
  el "$1 rc=$?"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|rel|bit for bit|reported twice" \
    "$R/$1.log" | head -40
  pack
}
step t1_ll_masked_gemm 90 'EpGaps.LowLatencyDispatchMaskedGemmCombineMatchesCpuAndReplaysInAGraph'
step t2_work_between 120 'EpGaps.WorkBetweenSendAndRecvMatchesReference'
step t3_nccl_graph 90 'EpGaps.NcclWireGraphCapturedRoundReplays'
step t4_after_timeout 60 'EpGaps.NewGroupAfterPeerTimeoutMatchesReference'
step control_moe_layer 60 'MoeLayerGpu.DispatchGroupedGemmCombineMatchesCpuAndReplaysInAGraph'
step t3b_nccl_graph_one_thread 60 'EpGaps.NcclWireGraphCapturedRoundReplaysOneThread'
el "done"
