#!/usr/bin/env bash
# Session 16 late (prepared for session 17), ep30: the normal mode's receive acknowledgements given
# by the rank's next normal send kernel (DeviceEpOptions::normal_defer_acks, ep_bench --ab letters
# e = the dispatch receive's, c = the combine receive's; off by default). Arithmetic and
# predictions: docs/comm/README.md "Session 16 late: the normal mode's acknowledgements on the
# next send, prepared (ep30)". Binaries: branch ep30 (BUILD_INFO.txt), `cmake --build
# build-bundle -j1 --target test_comm_gpu ep_bench`, stripped and xz-packed into
# build-ep30/bins.tar.xz; the code alone: docs/comm/runs/ep30-s16-next-send-acks.patch.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep30"], command="bash build-ep30/run.sh")
#   1. the NormalNextSendAck tests (a: FP8 on both GPUs, sequences, graphs, back to back, combine
#      backward, timeouts; b: BF16 and one GPU), then the existing tests whose harness moved
#      (NvlinkTest's cases and expand_on_host, ll_ack_test_util.h's overloads), under timeouts
#      (e, c timed only if a passes);
#   2. ep_bench --ab default,default+e,default+c,default+ec --ab-rounds 3 --blocks 64 --chunks 16
#      --ll-blocks 64 --ll-chunks 4, two processes.
# Read: scripts/comm/ep_ab_table.py ab_1.jsonl ab_2.jsonl (and the "# ab normal" lines of ab_*.log).
# One archive back: $OUT/ep30_s16.tgz. Expected ~2-3.5 min wall (+ a cold start); the timeouts
# keep it under 240 s (tests 100 + 55, A/B 2 x 40).
set -uo pipefail
bin=build-ep30/bin archive=build-ep30/bins.tar.xz name=ep30_s16
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ep30/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests (rc 77: skipped, no GPU).
Fa='NormalNextSendAck.*:-NormalNextSendAck.MatchesReferenceBf16AllGpus:NormalNextSendAck.MatchesReferenceFp8OneGpuManyRanks'
timeout 100 "$bin/test_comm_gpu" --gtest_filter="$Fa" > "$R/tests_a.log" 2>&1
rc=$?
el "1a. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests_a.log" | tail -20
pack
Fb='NormalNextSendAck.MatchesReferenceBf16AllGpus:NormalNextSendAck.MatchesReferenceFp8OneGpuManyRanks'
Fb+=':NvlinkTest.MatchesReferenceFp8AllGpus:NvlinkTest.Session15PayloadClaimsMatchReference'
Fb+=':LowLatencyNextKernelAck.GraphCapturedRoundReplays:LowLatencyNextKernelAck.RoundsBackToBack*'
Fb+=':LowLatencyNextKernelAck.PeerWithoutNextKernelIsNamedOnTheAcknowledgement'
timeout 55 "$bin/test_comm_gpu" --gtest_filter="$Fb" > "$R/tests_b.log" 2>&1
el "1b. tests rc=$?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests_b.log" | tail -8
pack

# 2. A/B, two processes.
variants=default,default+e,default+c,default+ec
[[ $rc -ne 0 ]] && variants=default && echo "ep30 tests failed or skipped (rc=$rc): e, c not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 40 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"
  grep -E "^# ab normal|MISMATCH|mismatch" "$R/ab_$i.log" | head -20
  pack
done
el "done"
