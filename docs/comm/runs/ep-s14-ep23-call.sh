#!/usr/bin/env bash
# Session 14 (helper ep23): the low-latency dispatch's destination order at 2 and 4 ranks, R / W
# ll_dispatch_rotate against the defaults (docs/comm/README.md "Session 14: the low-latency
# payload at 4 ranks (ep23)"). Runs the binaries built in /work/ep23 (main badac02 + ep23's diff;
# build-bundle configure of scripts/gpu_bundle.sh, static libstdc++, stripped, xz) and copied into
# the ignored folder build-ep23/ with this script as run.sh.
# Call: run(kind="nvidia-h100-x4", carry=["build-ep23"], command="bash build-ep23/run.sh")
# 1. the *LowLatencyRotate* tests and the default LL test on all 4 GPUs, under a timeout;
# 2. ep_bench LL A/B, 6 alternated rounds, 64 send blocks: new, newR, newW at 4 ranks (GPUs 0-3)
#    and at 2 (GPUs 0,1) as runs/ep-s13-x4-ll-grid.sh does (new only if a test failed);
# 3. phase stamps (FP8MOE_EP_LL_TRACE=1, 1 round) of the same variants at 4 ranks.
# One archive back: $OUT/ep23_s14.tgz. Expected ~80 s wall (+ a cold start).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
bin=build-ep23/bin archive=build-ep23/bins.tar.xz name=ep23_s14
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ep23/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -6 "$R/machine.txt"

# 1. Tests (all GPUs).
F='NvlinkTest.*LowLatencyRotate*:NvlinkTest.LowLatencyGraphCapturedRoundReplaysRotated'
F+=':NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 120 "$bin/test_comm_gpu" --gtest_filter="$F" \
  > "$R/tests.log" 2>&1
rc=$?
el "tests rc=$rc"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -30
pack
variants=new,newR,newW
[[ $rc -eq 0 ]] || variants=new

# 2. A/B at 4 and 2 ranks.
for gpus in 0,1,2,3 0,1; do
  n=$(tr -cd , <<< "$gpus" | wc -c); n=$((n + 1))
  CUDA_VISIBLE_DEVICES=$gpus timeout 60 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 \
    --iters 30 --ll-variants "$variants" --out "$R/ab_x$n.jsonl" --date "$d" > "$R/ab_x$n.log" 2>&1
  el "ab ranks $n rc=$?"
  grep -E "^# ab|MISMATCH|mismatch" "$R/ab_x$n.log" | head -12
  pack
done

# 3. Stamps, one round each, 4 ranks.
CUDA_VISIBLE_DEVICES=0,1,2,3 FP8MOE_EP_LL_TRACE=1 timeout 40 "$bin/ep_bench" --ab-ll 1 \
  --ll-blocks 64 --ll-chunks 4 --iters 5 --ll-variants "$variants" --out "$R/trace_x4.jsonl" \
  --date "$d" > "$R/trace_x4.log" 2>&1
el "trace rc=$?"
grep -E "ll_trace|ab_ll=" "$R/trace_x4.log" | head -60
pack
el "done"
