#!/usr/bin/env bash
# Session 9, first EP call (prepared by ep10 at the end of session 8, not yet run): the combine's
# twin of O. Applies nothing and builds nothing: it runs the binaries ep10 built here from main
# eb199cb + docs/comm/runs/ep-s9-prep-combine-release.patch (build-bundle configure of
# scripts/gpu_bundle.sh, static libstdc++, stripped) in the ignored folder build-ep10/
# (test_comm_gpu, ep_bench; O dispatch_release_only and K combine_release_only both off by default
# in them, so "default" below is main's defaults of session 8's end, X on).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep10"],
#           command="bash docs/comm/runs/ep-s9-prep-call1.sh")   (or "bash build-ep10/run.sh", a copy)
# 1. the GPU tests that cover the combine, without K (defaults) and with K (and O + K);
# 2. ep_bench A/B, 3 rounds: default, default+O, default+K, default+OK;
# 3. plain sweeps of default and default+OK;
# 4. phase stamps (FP8MOE_EP_TRACE=1, 1 round) of default, default+K, default+OK.
# Everything goes into one archive, $OUT/ep10_s9_call1.tgz (a call returns at most 8 files).
# EP10_ALL_TESTS=1 runs the whole test_comm_gpu in step 1 instead (~6 min at 2 GPUs: the call
# then passes 600 s with the rest; run steps 2-4 in a second call with EP10_SKIP_TESTS=1).
set -uo pipefail
# The repository root: the folder above this script that holds build-ep10 (so a copy of the
# script run as build-ep10/run.sh works too).
root=$(cd "$(dirname "$0")" && pwd)
while [[ ! -d "$root/build-ep10" && "$root" != / ]]; do root=$(dirname "$root"); done
cd "$root" || exit 1
B=build-ep10
[[ -x $B/test_comm_gpu && -x $B/ep_bench ]] || { echo "no binaries in $root/$B"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/ep10}; R=/tmp/ep10raw; rm -rf "$R"; mkdir -p "$O" "$R"
{ date -u; nvidia-smi -L; cat "$B/BUILD_INFO.txt" 2>/dev/null; } > "$R/machine.txt" 2>&1; head -4 "$R/machine.txt"
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
d=$(date -u +%F)
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"

# 1. Tests. Without K: the defaults' combine in every case (FP8, BF16), the combine send grid of
# its own, the graph, the silent combine peer, the overflow, back-to-back rounds and the combine
# backward cases; with K: CombineReleaseOnlyMatchesReference (K alone and O + K, every case, both
# payloads, one GPU, 64 send blocks, NCCL wire) and the K / O + K cases that GraphCaptured...,
# CombineSilentPeer..., OverflowIsReported, RoundsBackToBack... and CombineBackwardGpuTest.* hold.
if [[ "${EP10_SKIP_TESTS:-0}" != 1 ]]; then
  if [[ "${EP10_ALL_TESTS:-0}" == 1 ]]; then
    F='*'
  else
    F='NvlinkTest.CombineReleaseOnlyMatchesReference:NvlinkTest.MatchesReferenceFp8AllGpus'
    F+=':NvlinkTest.MatchesReferenceBf16AllGpus:NvlinkTest.UnmeasuredCombineOptionsMatchReference'
    F+=':NvlinkTest.GraphCapturedRoundReplays:NvlinkTest.CombineSilentPeerEndsWithErrorNamingRankPeerCounter'
    F+=':NvlinkTest.OverflowIsReported:NvlinkTest.RoundsBackToBackWithoutHostSyncMatchReference'
    F+=':CombineBackwardGpuTest.*'
  fi
  timeout 420 "$B/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
  echo "tests rc=$? ($(el))"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -40
fi

# 2. A/B, 3 rounds, order rotating (the "# ab" lines: medians).
V=default,default+O,default+K,default+OK
timeout 200 "$B/ep_bench" --ab $V --ab-rounds 3 $COMMON --out "$R/ab.jsonl" --date "$d" > "$R/ab.log" 2>&1
echo "ab rc=$? ($(el))"; grep -E '^# ab|MISMATCH' "$R/ab.log"

# 3. Plain sweeps (the lesson of session 5: a default is timed in the sweep too).
for v in default default+OK; do
  timeout 90 "$B/ep_bench" --variant "$v" $COMMON --date "$d" --out "$R/sweep_${v}.jsonl" > "$R/sweep_${v}.log" 2>&1
  echo "sweep $v rc=$? ($(el))"; grep -E "^fp8moe +(normal|low_latency) +(dispatch|combine)" "$R/sweep_${v}.log" | head -6
done

# 4. Phase stamps, 1 round (printed by check(): the combine's send and receive ends among them).
FP8MOE_EP_TRACE=1 timeout 120 stdbuf -oL -eL "$B/ep_bench" --ab default,default+K,default+OK --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
echo "trace rc=$? ($(el))"; grep -E '^# ab normal|MISMATCH' "$R/trace.log"

tar czf "$O/ep10_s9_call1.tgz" -C "$R" .
echo "done ($(el))"
