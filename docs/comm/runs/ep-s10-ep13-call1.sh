#!/usr/bin/env bash
# Session 10, ep13's call: the gathered path (dispatch to the layout, the grouped GEMM reading the
# received records through row_record) against the expanded path. Builds nothing: runs the
# binaries built in /work/ep13 (main 858bc83 + ep13's diff + gemm17's kernels diff; build-bundle
# configure of scripts/gpu_bundle.sh, static libstdc++, stripped), copied into the ignored folder
# build-ep13/ with main's session-9 ep_bench (ep_bench_main) for the same-call dispatch A/B.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep13"], command="bash build-ep13/run.sh")
# 1. tests: MoeLayerGpu.* (the gathered path bit for bit against the expanded one: 2 GPUs NVLink,
#    2 GPUs NCCL, 3 ranks on one GPU, two rounds each) and the normal-kernel cases of the changed
#    dispatch receive (FP8/BF16 all GPUs, ranks sharing a GPU, NCCL wire, rounds back to back,
#    overflow, combine backward with layout-only rounds);
# 2. moe_forward_bench: forward / dispatch / gemm / scales of both paths, 3 rounds;
# 3. ep_bench plain sweeps, main's binary then this one's (the dispatch receive's new stores).
# Everything goes into one archive, $OUT/ep13_s10_call1.tgz.
set -uo pipefail
root=$(cd "$(dirname "$0")" && pwd)
while [[ ! -d "$root/build-ep13" && "$root" != / ]]; do root=$(dirname "$root"); done
cd "$root" || exit 1
B=build-ep13
# The binaries travel xz-packed (the tree plus the folder must stay under 64 MiB).
[[ -f $B/bins.tar.xz && ! -x $B/test_comm_gpu ]] && tar xJf $B/bins.tar.xz -C $B
[[ -x $B/test_comm_gpu && -x $B/moe_forward_bench ]] || { echo "no binaries in $root/$B"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
O=${OUT:-/tmp/ep13}; R=/tmp/ep13raw1; rm -rf "$R"; mkdir -p "$O" "$R"
{ date -u; nvidia-smi -L; cat "$B/BUILD_INFO.txt" 2>/dev/null; } > "$R/machine.txt" 2>&1; head -4 "$R/machine.txt"
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
d=$(date -u +%F)
finish() { tar czf "$O/ep13_s10_call1.tgz" -C "$R" . ; echo "archive ($(el))"; }
trap finish EXIT

# 1. Tests (one filter for the one binary).
F='MoeLayerGpu.*:NvlinkTest.MatchesReferenceFp8AllGpus:NvlinkTest.MatchesReferenceBf16AllGpus'
F+=':NvlinkTest.MatchesReferenceFp8OneGpuManyRanks:NvlinkTest.NcclWireMatchesReference'
F+=':NvlinkTest.RoundsBackToBackWithoutHostSyncMatchReference:NvlinkTest.OverflowIsReported'
F+=':CombineBackwardGpuTest.MatchesReferenceAllGpus'
timeout 150 "$B/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
echo "tests rc=$? ($(el))"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|Failure|^\[       OK|gathered path ==|GEMM \|y" "$R/tests.log" | head -60

# 2. The forward up to the expert GEMM, both paths.
timeout 120 "$B/moe_forward_bench" --rounds 3 --iters 20 --out "$R/moe_forward.jsonl" --date "$d" \
  --commit "858bc83+ep13+gemm17" > "$R/moe_forward.log" 2>&1
echo "moe_forward_bench rc=$? ($(el))"; cat "$R/moe_forward.log" | grep -v "^round"

# 3. ep_bench plain sweeps: main's session-9 binary, then this tree's.
for b in ep_bench_main ep_bench; do
  timeout 75 "$B/$b" --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" \
    --out "$R/sweep_$b.jsonl" > "$R/sweep_$b.log" 2>&1
  echo "sweep $b rc=$? ($(el))"; grep -E "^fp8moe +normal +(dispatch|combine)|^nccl +normal" "$R/sweep_$b.log" | head -8
done
