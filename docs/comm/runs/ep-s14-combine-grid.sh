#!/usr/bin/env bash
# Session 14 (lead): with ep21's dispatch_recv_bulk_rows a default (letter q takes it back), the
# tests whose cases run the defaults (the receive's bulk row copies at every case: all GPUs, many
# ranks on one GPU, the two-stage route, one process per GPU, the MoE layer), then the combine's
# send grid with ep19's bulk send (a default since session 13; the grid was last swept with the
# register send, session 6: 85 blocks +5.6 %): `:gN` = DeviceEpOptions::combine_blocks (the
# receive takes the other SMs, then all). Two processes x 3 rounds, V3 shape.
# docs/comm/README.md "Session 14: ep20 and ep21 measured; the combine's send grid".
# Binaries: the bundle of `bash scripts/gpu_bundle.sh` at the commit in BUILD_INFO (main + j).
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s14-combine-grid.sh")   (~2.5 min wall + cold start)
# One archive back: $OUT/ep_s14_grid.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ep_s14_grid
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=0,1
filter='NvlinkTest.MatchesReference*:NvlinkTest.GraphCapturedRoundReplays:NvlinkTest.Session13LateRecvBulk*'
filter+=':NvlinkTest.RoundsBackToBack*:NvlinkTest.OverflowIsReported:NvlinkTest.SilentPeer*'
filter+=':NvlinkTest.MoreSendBlocks*:ForwardTest.NodesOnOneGpu:ForwardTest.NodesOfGpusNvlinkWire'
filter+=':EpMultiProcess.*:MoeLayerGpu.*:CombineBackwardGpuTest.MatchesReferenceOneGpuManyRanks'
timeout 200 "$bin/test_comm_gpu" --gtest_filter="$filter" > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|tests ran" "$R/tests.log"
pack
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
variants=default,default+q,default:g40,default:g48,default:g56,default:g72,default:g80
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 120 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
el "done"
