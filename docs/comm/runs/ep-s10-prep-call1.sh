#!/usr/bin/env bash
# Session 10, first EP call: session 9 late's b (ll_send_bulk, helper ep12), prepared without a
# device. Builds nothing: runs the binaries built in /work/ep12 (main afef196 + ep12's diff =
# runs/ep-s10-prep-ll-bulk.patch; build-bundle configure of scripts/gpu_bundle.sh, static
# libstdc++, stripped) and copied into the ignored folder build-ep12/ (test_comm_gpu, ep_bench;
# b off by default in them, every default as in main afef196).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep12"], command="bash build-ep12/run.sh")
# 1. the low-latency GPU tests with b (every case, rows over rounds, graph, silent peer, bad id,
#    back to back) and the defaults' low-latency cases;
# 2. ep_bench A/B, 3 rounds: default, default+b (low_latency rows move, normal rows must not);
# 3. plain sweeps of default and default+b;
# 4. low-latency phase stamps (FP8MOE_EP_LL_TRACE=1, 1 round) of default and default+b;
# 5. the SASS of the low-latency dispatch send's two instances (cuobjdump): what cp.async.bulk,
#    its waits and the proxy fences become.
# Everything goes into one archive, $OUT/ep12_s10_call1.tgz. EP12_SKIP_TESTS=1 skips step 1.
set -uo pipefail
root=$(cd "$(dirname "$0")" && pwd)
while [[ ! -d "$root/build-ep12" && "$root" != / ]]; do root=$(dirname "$root"); done
cd "$root" || exit 1
B=build-ep12
[[ -x $B/test_comm_gpu && -x $B/ep_bench ]] || { echo "no binaries in $root/$B"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/ep12}; R=/tmp/ep12raw1; rm -rf "$R"; mkdir -p "$O" "$R"
{ date -u; nvidia-smi -L; cat "$B/BUILD_INFO.txt" 2>/dev/null; } > "$R/machine.txt" 2>&1; head -4 "$R/machine.txt"
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
d=$(date -u +%F)
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"

# 1. Tests (filters per binary). ~45 s expected (session 9's 8 low-latency tests took 27 s).
if [[ "${EP12_SKIP_TESTS:-0}" != 1 ]]; then
  F='NvlinkTest.LowLatencySendBulk*'
  F+=':NvlinkTest.LowLatencyRowsChangeBetweenRounds:NvlinkTest.LowLatencyGraphCapturedRoundReplays'
  F+=':NvlinkTest.LowLatencySilentPeerEndsWithErrorNamingRankPeerCounter'
  F+=':NvlinkTest.LowLatencyBadExpertIdIsReported:NvlinkTest.RoundsBackToBackWithoutHostSyncMatchReference'
  F+=':NvlinkTest.LowLatencyMatchesReferenceFp8AllGpus'
  timeout 240 "$B/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
  echo "tests rc=$? ($(el))"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -40
fi

# 2. A/B, 3 rounds, order rotating (the "# ab" lines: medians).
V=default,default+b
timeout 120 "$B/ep_bench" --ab $V --ab-rounds 3 $COMMON --out "$R/ab.jsonl" --date "$d" > "$R/ab.log" 2>&1
echo "ab rc=$? ($(el))"; grep -E '^# ab|MISMATCH' "$R/ab.log"

# 3. Plain sweeps (a default is timed in the sweep too).
for v in default default+b; do
  timeout 80 "$B/ep_bench" --variant "$v" $COMMON --date "$d" --out "$R/sweep_${v/+/}.jsonl" > "$R/sweep_${v/+/}.log" 2>&1
  echo "sweep $v rc=$? ($(el))"; grep -E "^fp8moe +(normal|low_latency) +(dispatch|combine)" "$R/sweep_${v/+/}.log" | head -6
done

# 4. Low-latency phase stamps, 1 round (printed by check() after every timed op).
FP8MOE_EP_LL_TRACE=1 timeout 80 stdbuf -oL -eL "$B/ep_bench" --ab "$V" --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
echo "trace rc=$? ($(el))"; grep -E '^# ab low_latency|MISMATCH' "$R/trace.log"

# 5. SASS of the low-latency dispatch send (both instances), if cuobjdump is there.
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null)
if [[ -n "$CUOBJ" ]]; then
  timeout 60 "$CUOBJ" -sass "$B/ep_bench" 2>/dev/null | awk '/Function : /{keep = /sm90_device_ep_ll.*k_dispatch_send/} keep' | gzip > "$R/ll_sass.txt.gz"
  echo "sass ($(el)): $(zcat "$R/ll_sass.txt.gz" | grep -c 'Function :') functions"
fi

tar czf "$O/ep12_s10_call1.tgz" -C "$R" .
echo "done ($(el))"
