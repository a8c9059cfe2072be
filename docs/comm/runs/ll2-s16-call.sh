#!/usr/bin/env bash
# Session 16, ll2: the low-latency receives' acknowledgements given by the rank's next LL send
# kernel (DeviceEpOptions::ll_defer_acks, ep_bench --ll-variants letters F = dispatch, G = combine,
# Z = from block 0's warp 0 instead of the last block's last warp; all off by default). Arithmetic
# and predictions: docs/comm/README.md "Session 16: LL acknowledgements on the next kernel (ll2)".
# Binaries: branch ll2 (BUILD_INFO.txt), `cmake --build build-bundle --target test_comm_gpu
# ep_bench`, stripped and xz-packed into build-ll2/bins.tar.xz.
# Call: run(kind="nvidia-h100-x2", carry=["build-ll2"], command="bash build-ll2/run.sh")
#   1. the LowLatencyNextKernelAck tests and the default LL test (F, G timed only if they pass);
#   2. ep_bench --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 --ll-variants
#      new,newD,newF,newG,newFG,newFGZ in two processes (the second also --ll-graph 8);
#   3. one round with FP8MOE_EP_LL_TRACE=1 (the phase stamps of every variant).
# Read: scripts/comm/ep_ab_table.py ll_1.jsonl ll_2.jsonl --mode low_latency --ll-trace
# ll_trace.log. One archive back: $OUT/ll2_s16.tgz. Expected ~1.5-2.5 min wall (+ a cold start);
# the timeouts keep it under 230 s (tests 140, A/B 2 x 35, trace 20).
set -uo pipefail
bin=build-ll2/bin archive=build-ll2/bins.tar.xz name=ll2_s16
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-ll2/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests.
F='LowLatencyNextKernelAck.*:NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
timeout 140 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log" | tail -20
pack

# 2. A/B, two processes.
llv=new,newD,newF,newG,newFG,newFGZ
[[ $rc -ne 0 ]] && llv=new,newD && echo "ll2 tests failed (rc=$rc): F, G not timed"
for i in 1 2; do
  extra=()
  [[ $i == 2 ]] && extra=(--ll-graph 8)
  timeout 35 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
    --ll-variants "$llv" "${extra[@]}" --out "$R/ll_$i.jsonl" --date "$d" > "$R/ll_$i.log" 2>&1
  el "2. ll $i rc=$?"
  grep -E "^# ab_ll|^# ll_graph|MISMATCH|mismatch" "$R/ll_$i.log" | head -20
  pack
done

# 3. One traced round.
FP8MOE_EP_LL_TRACE=1 timeout 20 "$bin/ep_bench" --ab-ll 1 --ll-blocks 64 --ll-chunks 4 \
  --iters 5 --ll-variants "$llv" --out "$R/ll_trace.jsonl" --date "$d" > "$R/ll_trace.log" 2>&1
el "3. ll trace rc=$?"
grep -E "^ll_trace" "$R/ll_trace.log" | head -40
pack
el "done"
