#!/usr/bin/env bash
# Prepared at the end of session 13 (helper ep18) for session 14: Q ll_payload_split against P
# ll_payload_first and the defaults (docs/comm/README.md "Session 13: the LL payload before the
# plan (ep18)", the part "Q, prepared"). Runs the binaries built in /work/ep18 (main ccecdca +
# ep18's diff with P and Q; build-bundle configure of scripts/gpu_bundle.sh, static libstdc++,
# stripped, xz) and copied into the ignored folder build-ep18/ with this script as run.sh.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep18"], command="bash build-ep18/run.sh")
# 1. the P and Q tests and the default LL test (filters per binary, under a timeout);
# 2. ep_bench LL A/B, 6 alternated rounds: new (defaults), newP, newQ, 64 send blocks;
# 3. phase stamps (FP8MOE_EP_LL_TRACE=1, 1 round) of all three.
# One archive back: $OUT/ep18_s14.tgz. Expected ~75 s wall (+ a cold start).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bin=build-ep18/bin archive=build-ep18/bins.tar.xz name=ep18_s14
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ep18/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"

# 1. Tests.
F='NvlinkTest.LowLatencyPayloadFirst*:NvlinkTest.LowLatencyPayloadSplit*'
F+=':NvlinkTest.LowLatencyGraphCapturedRoundReplaysPayloadFirst'
F+=':NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
timeout 150 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
el "tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -30
pack

# 2. A/B.
timeout 90 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
  --ll-variants new,newP,newQ --out "$R/ab.jsonl" --date "$d" > "$R/ab.log" 2>&1
el "ab rc=$?"
grep -E "^# ab|MISMATCH|mismatch" "$R/ab.log" | head -20
pack

# 3. Stamps, one round each.
FP8MOE_EP_LL_TRACE=1 timeout 40 "$bin/ep_bench" --ab-ll 1 --ll-blocks 64 --ll-chunks 4 --iters 5 \
  --ll-variants new,newP,newQ --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
el "trace rc=$?"
grep -E "ll_trace|ab_ll=" "$R/trace.log" | head -80
pack
el "done"
