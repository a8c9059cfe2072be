#!/usr/bin/env bash
# Session 16, call 1 (lead): session 15's three prepared items in one binary (main 5b91298 + the
# patches runs/ep-s15-ep29-recv-own-first.patch, runs/ll1-s15.patch, runs/tt1-s15-test-time.patch;
# every new option off, so the defaults are main's kernels: the PTX checks of ep29 and ll1),
# built by scripts/gpu_bundle.sh, test_comm_gpu and ep_bench stripped into build-s16/bins.tar.xz.
# Call: run(kind="nvidia-h100-x2", carry=["build-s16"], command="bash build-s16/run.sh")
#   1. ep29's and ll1's new tests under timeouts (a variant whose tests fail is not timed);
#   2. normal A/B, two processes x 3 rounds: default, +p (ep25's claims off), :m16 (ep26's combine
#      chunk off) — the H100 A/B of session 15's defaults if H100s come — and ep29's y, h, h:m4;
#      the second process with FP8MOE_EP_TRACE=1 (ep29's receive-tail stamps);
#   3. ll1: --ab-ll 6 new,newD in two processes (the second also --ll-graph 8), then one traced
#      round.
# Read: scripts/comm/ep_ab_table.py ab_1.jsonl ab_2.jsonl; runs/ep29-combine-stamps.py ab_2.log;
# ep_ab_table.py ll_1.jsonl ll_2.jsonl --mode low_latency --ll-trace ll_trace.log.
set -uo pipefail
bin=build-s16/bin archive=build-s16/bins.tar.xz name=s16_call1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-s16/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
export CUDA_VISIBLE_DEVICES=0,1

# 1. Tests.
timeout 150 "$bin/test_comm_gpu" \
  --gtest_filter='*Session15OwnFirst*:*Session15CombineChunkSilentPeerNamesCombineChunk:*Session13BulkRowsGraphCapturedRoundReplays' \
  > "$R/tests_ep29.log" 2>&1
rc29=$?
el "1a. ep29 tests rc=$rc29"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$R/tests_ep29.log"
pack
timeout 200 "$bin/test_comm_gpu" \
  --gtest_filter='LowLatencyDeferAck.*:NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus' \
  > "$R/tests_ll1.log" 2>&1
rcll=$?
el "1b. ll1 tests rc=$rcll"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$R/tests_ll1.log"
pack

# 2. Normal A/B.
variants=default,default+p,default:m16,default+y,default+h,default+h:m4
[[ $rc29 -ne 0 ]] && variants=default,default+p,default:m16 && echo "ep29 tests failed: h, y not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  pre=()
  [[ $i == 2 ]] && pre=(env FP8MOE_EP_TRACE=1)
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 150 "${pre[@]}" "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"
  grep -E "^# ab normal" "$R/ab_$i.log" | head -30
  pack
done

# 3. Low latency.
llv=new,newD
[[ $rcll -ne 0 ]] && llv=new && echo "ll1 tests failed: D not timed"
for i in 1 2; do
  extra=()
  [[ $i == 2 ]] && extra=(--ll-graph 8)
  timeout 90 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 \
    --ll-variants "$llv" "${extra[@]}" --out "$R/ll_$i.jsonl" --date "$d" > "$R/ll_$i.log" 2>&1
  el "3. ll $i rc=$?"
  grep -E "^# ab_ll|^# ll_graph|MISMATCH|mismatch" "$R/ll_$i.log" | head -12
  pack
done
FP8MOE_EP_LL_TRACE=1 timeout 40 "$bin/ep_bench" --ab-ll 1 --ll-blocks 64 --ll-chunks 4 \
  --iters 5 --ll-variants "$llv" --out "$R/ll_trace.jsonl" --date "$d" > "$R/ll_trace.log" 2>&1
el "3. ll trace rc=$?"
pack
el "done"
