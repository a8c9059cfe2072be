#!/usr/bin/env bash
# Session 12, the lead's 4-GPU call (4-GPU kinds are lent; the last 4-GPU numbers are session 7's).
# Binaries: the bundle of `bash scripts/gpu_bundle.sh` at 1ea0704 (EP code as the final tree's).
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s12-call3-x4.sh")
#   1. test_comm_gpu on all 4 GPUs, the defaults' cases only (FP8 / BF16 / low latency against the
#      reference, the NCCL wire, the two-stage route on GPU nodes, one process per GPU, combine
#      backward, the MoE layer's gathered == expanded, the 16-byte record stride);
#   2. scripts/comm/ep_device_suite.sh on 4 GPUs: ep_bench with the defaults (normal and low
#      latency beside NCCL and the peer copy) and the two-stage route with 2 nodes of 2 GPUs.
# Archives back: $OUT/tests.tgz, $OUT/x4/ep_suite.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=tests
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
F=NvlinkTest.MatchesReferenceFp8AllGpus:NvlinkTest.MatchesReferenceBf16AllGpus
F=$F:NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus:NvlinkTest.NcclWireMatchesReference
F=$F:NvlinkTest.Session11AlignedRecordsMatchReference:ForwardTest.NodesOfGpusNvlinkWire
F=$F:EpMultiProcess.OneProcessPerGpuMatchesReference:CombineBackwardGpuTest.MatchesReferenceAllGpus
F=$F:MoeLayerGpu.GatheredPathEqualsExpandedPathTwoGpus
timeout 200 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/test_comm_gpu.log" 2>&1
el "1. test_comm_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|^\[       OK \]" "$R/test_comm_gpu.log" | head -20
pack
OUT=$O/x4 SUITE_COMM_TESTS=0 SUITE_GEMM=0 SUITE_XNODE=2 timeout 240 bash scripts/comm/ep_device_suite.sh 2>&1 | tail -40
el "2. ep_device_suite rc=$?"
el "done"
