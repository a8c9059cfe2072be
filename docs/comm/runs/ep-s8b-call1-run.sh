#!/usr/bin/env bash
# ep9 call 1: dispatch prologue. Stamps (trace, 1 round) of default / +G / +X / +GX / +GXO; A/B x3
# of the same; session 7's build as same-call baseline; plain sweeps default and default+GXO;
# then the GPU tests that cover the changed paths.
set -uo pipefail
cd "$(dirname "$0")/.."
B=build-ep9
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/ep9}; R=/tmp/ep9raw; rm -rf "$R"; mkdir -p "$O" "$R"
{ date -u; nvidia-smi -L; } > "$R/machine.txt" 2>&1; head -3 "$R/machine.txt"
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
d=$(date -u +%F)
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
V=default,default+G,default+X,default+GX,default+GXO
FP8MOE_EP_TRACE=1 timeout 120 stdbuf -oL -eL $B/ep_bench --ab $V --ab-rounds 1 $COMMON --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
echo "trace rc=$? ($(el))"; grep -E '^# ab normal|MISMATCH' "$R/trace.log"
grep -E 'ep_trace rank|normal +dispatch +fp8' "$R/trace.log" | grep -B2 'normal +dispatch +fp8' | grep -v '^--' | head -40
timeout 150 $B/ep_bench --ab $V --ab-rounds 3 $COMMON --out "$R/ab.jsonl" --date "$d" > "$R/ab.log" 2>&1
echo "ab rc=$? ($(el))"; grep -E '^# ab normal|MISMATCH' "$R/ab.log"
timeout 90 build-regress/ep_bench_s7 --ab default --ab-rounds 3 $COMMON --out "$R/ab_s7.jsonl" --date "$d" > "$R/ab_s7.log" 2>&1
echo "ab s7 rc=$? ($(el))"; grep -E '^# ab normal' "$R/ab_s7.log"
for v in default default+GXO; do
  timeout 60 $B/ep_bench --variant "$v" $COMMON --date "$d" --out "$R/sweep_${v}.jsonl" > "$R/sweep_${v}.log" 2>&1
  echo "sweep $v rc=$? ($(el))"; grep -E "^fp8moe +normal +(dispatch|combine)" "$R/sweep_${v}.log" | head -4
done
F='NvlinkTest.Session8PrologueOptionsMatchReference:NvlinkTest.GraphCapturedRoundReplays:NvlinkTest.OverflowIsReported:NvlinkTest.SilentPeerEndsWithErrorNamingRankPeerCounter:NvlinkTest.BadExpertIdIsReported:NvlinkTest.MatchesReferenceFp8AllGpus'
timeout 240 $B/test_comm_gpu --gtest_filter="$F" > "$R/tests.log" 2>&1
echo "tests rc=$? ($(el))"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -20
tar czf "$O/ep9_call1.tgz" -C "$R" .
