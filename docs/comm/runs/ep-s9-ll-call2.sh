#!/usr/bin/env bash
# Session 9, helper ep11, call 2: E (ll_send_batch_ids), J in its second form (the stale-row reset
# back before the copies), and the receive grid over every SM (:r132). Builds nothing: runs the
# binaries built in /work/ep11 (main 464ffc1 + ep11's
# diff; build-bundle configure of scripts/gpu_bundle.sh, static libstdc++, stripped) and copied
# into the ignored folder build-ep11/ (test_comm_gpu, ep_bench; J, M, H, E off by default in them).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep11"], command="bash build-ep11/run.sh")
# 1. the low-latency GPU tests with J, M, H, E, back-to-back rounds included;
# 2. ep_bench A/B, 3 rounds: default, default+E, +J, +EJ, +H (again), default:r132
#    (low_latency rows move, normal rows must not);
# 3. plain sweeps of default and of the variant with the lowest low-latency dispatch + combine
#    medians in step 2 (BEST=... overrides);
# 4. low-latency phase stamps (FP8MOE_EP_LL_TRACE=1, 1 round) of default, default+E, the best;
# 5. the SASS of the low-latency dispatch send's two instances (cuobjdump).
# Everything goes into one archive, $OUT/ep11_s9_ll2.tgz.
set -uo pipefail
root=$(cd "$(dirname "$0")" && pwd)
while [[ ! -d "$root/build-ep11" && "$root" != / ]]; do root=$(dirname "$root"); done
cd "$root" || exit 1
B=build-ep11
[[ -x $B/test_comm_gpu && -x $B/ep_bench ]] || { echo "no binaries in $root/$B"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/ep11}; R=/tmp/ep11raw2; rm -rf "$R"; mkdir -p "$O" "$R"
{ date -u; nvidia-smi -L; cat "$B/BUILD_INFO.txt" 2>/dev/null; } > "$R/machine.txt" 2>&1; head -4 "$R/machine.txt"
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
d=$(date -u +%F)
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"

# 1. Tests (filters per binary).
if [[ "${EP11_SKIP_TESTS:-0}" != 1 ]]; then
  F='NvlinkTest.LowLatencySession9Options*'
  F+=':NvlinkTest.LowLatencyRowsChangeBetweenRounds:NvlinkTest.LowLatencyGraphCapturedRoundReplays'
  F+=':NvlinkTest.LowLatencySilentPeerEndsWithErrorNamingRankPeerCounter'
  F+=':NvlinkTest.LowLatencyBadExpertIdIsReported:NvlinkTest.RoundsBackToBackWithoutHostSyncMatchReference'
  timeout 200 "$B/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
  echo "tests rc=$? ($(el))"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK" "$R/tests.log" | head -40
fi

# 2. A/B, 3 rounds, order rotating (the "# ab" lines: medians).
V=default,default+E,default+J,default+EJ,default+H,default:r132
timeout 150 "$B/ep_bench" --ab $V --ab-rounds 3 $COMMON --out "$R/ab.jsonl" --date "$d" > "$R/ab.log" 2>&1
echo "ab rc=$? ($(el))"; grep -E '^# ab|MISMATCH' "$R/ab.log"

# 3. Plain sweeps (a default is timed in the sweep too): default and the best of step 2.
best=${BEST:-$(awk '/^# ab low_latency/ && $4 == "dispatch" {d[$5] = $6} /^# ab low_latency/ && $4 == "combine" {c[$5] = $6}
  END {b = "default"; for (v in d) if ((v in c) && (bs == "" || d[v] + c[v] < bs)) {bs = d[v] + c[v]; b = v}; print b}' "$R/ab.log")}
echo "best low-latency variant: $best"
for v in default $([[ $best != default ]] && echo "$best"); do
  timeout 80 "$B/ep_bench" --variant "$v" $COMMON --date "$d" --out "$R/sweep_${v}.jsonl" > "$R/sweep_${v}.log" 2>&1
  echo "sweep $v rc=$? ($(el))"; grep -E "^fp8moe +(normal|low_latency) +(dispatch|combine)" "$R/sweep_${v}.log" | head -6
done

# 4. Low-latency phase stamps, 1 round (printed by check() after every timed op).
TV=default,default+E; [[ $best != default && $best != default+E ]] && TV+=",$best"
FP8MOE_EP_LL_TRACE=1 timeout 80 stdbuf -oL -eL "$B/ep_bench" --ab "$TV" --ab-rounds 1 $COMMON \
  --out "$R/trace.jsonl" --date "$d" > "$R/trace.log" 2>&1
echo "trace rc=$? ($(el))"; grep -E '^# ab low_latency|MISMATCH' "$R/trace.log"

# 5. SASS of the low-latency kernels (what st.release.sys / red.release.sys / ld.acquire.sys and
# the plan's id loads become), if cuobjdump is there.
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null)
if [[ -n "$CUOBJ" ]]; then
  timeout 60 "$CUOBJ" -sass "$B/ep_bench" 2>/dev/null | awk '/Function : /{keep = /sm90_device_ep_ll.*k_dispatch_send/} keep' | gzip > "$R/ll_sass.txt.gz"
  echo "sass ($(el)): $(zcat "$R/ll_sass.txt.gz" | grep -c 'Function :') functions"
fi

tar czf "$O/ep11_s9_ll2.tgz" -C "$R" .
echo "done ($(el))"
