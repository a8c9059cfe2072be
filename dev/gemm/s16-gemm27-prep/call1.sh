#!/usr/bin/env bash
# Session 16 late, call 1 (prepared by gemm27): split-K inside a cluster, partials reduced through
# distributed shared memory. GemmTileConfig::split_k_cluster (forced only): the split_k (2 or 4)
# K slices of a tile run as the CTAs of one cluster; ranks > 0 send their FP32 accumulators to
# rank 0's shared memory, rank 0 adds them in slice order and stores (no workspace, no counters).
# Kernels: 128x128 and 64x128 split-K with the B-scale prefetch (kMode 9).
# dev/gemm/NOTES.md "Session 16 late — split-K in a cluster with a DSMEM reduction, prepared
# (gemm27)". Binaries: build-gemm27/bins.tar.xz (stripped; BUILD_INFO.txt; this script is
# build-gemm27/run.sh, a copy of dev/gemm/s16-gemm27-prep/call1.sh). Call:
#   run(kind="nvidia-h200", carry=["build-gemm27"], command="bash build-gemm27/run.sh")
#   1. test_kernels_gpu --gtest_filter='Fp8GemmGpuClusterSplitK.*' under timeout 120 (against the
#      CPU reference and bit for bit against the workspace split);
#   2. gemm_bench --only dense --m 128,64 (lean: picks + cuBLASLt + the forced rows below), twice
#      (timeout 70 each, less if the wall budget is short); table.md by csplit_table.py;
#   3. if <= 170 s have passed: ncu (caches flushed, clocks not locked, gemm26's metric list) of
#      one launch each at 128 x 7168 x 16384: the pick, 128x128 split2 plain and in a cluster,
#      cuBLASLt.
# Everything bounded so the call ends < 220 s wall. One archive back: $OUT/gemm27_call1.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM27_BIN:-build-gemm27/bin} archive=build-gemm27/bins.tar.xz name=gemm27_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
tbl=$root/dev/gemm/csplit_table.py
cp build-gemm27/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
# Seconds a step may take: its nominal limit, cut to what is left of a 215 s budget.
budget() { local left=$((215 - ($(date +%s) - t0))); echo $(($1 < left ? $1 : left)); }

FP8MOE_GEMM_VERBOSE=1 timeout "$(budget 120)" "$bin/test_kernels_gpu" \
  --gtest_filter='Fp8GemmGpuClusterSplitK.*' > "$R/test_csplit.log" 2>&1
el "1. Fp8GemmGpuClusterSplitK rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|^\[       OK|clusters of" "$R/test_csplit.log" | sort -u | head -20
pack

# 128x128 split2 = the H200 pick at 128 x 7168 x 16384 (cuBLASLt's nvjet: 128x128 split-K in 4x1
# clusters), split4 (the cluster form gets 5 stages: the plain split4 at s5 beside it); 64x128
# split2 / split4 (H100's pick at 128 x 7168 x 16384 is 64x128). Plain rows with the B-scale
# prefetch, as the cluster kernels have it.
tiles=128x128k2w2q,128x128k2w2cq,128x128k4w2q,128x128k4s5w2q,128x128k4w2cq
tiles+=,64x128k2w2q,64x128k2w2cq,64x128k4w2q,64x128k4w2cq
for run in 1 2; do
  lim=$(budget 70)
  if ((lim < 20)); then el "2. bench run $run skipped (${lim} s left)"; continue; fi
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles timeout "$lim" "$bin/gemm_bench" \
    --only dense --m 128,64 --out "$R/small_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 "$tbl" "$R"/small_run*.jsonl > "$R/table.md" 2>&1
head -40 "$R/table.md"
pack

if (($(date +%s) - t0 <= 170)) && command -v ncu > /dev/null; then
  left=$(budget 60)
  # Only the metrics this ncu knows (an unknown name fails the whole run); session 14's list.
  ncu --query-metrics > "$R/ncu_metrics_known.txt" 2>&1
  metrics=""
  for m in gpu__time_duration.sum dram__bytes_read.sum dram__throughput.avg.pct_of_peak_sustained_elapsed \
    lts__t_sector_hit_rate.pct lts__t_sectors_srcunit_tex_op_read.sum \
    lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum \
    sm__cycles_active.max; do
    grep -qw -- "${m%%.*}" "$R/ncu_metrics_known.txt" && metrics+=${metrics:+,}$m
  done
  [[ -n $metrics ]] || metrics=gpu__time_duration.sum,dram__bytes_read.sum
  echo "metrics: $metrics" > "$R/ncu_128_7168_16384.txt"
  FP8MOE_BENCH_PROFILE_TILES=128x128k2w2q,128x128k2w2cq \
    timeout "$((left - 3))" ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' \
    --metrics "$metrics" "$bin/gemm_bench" --profile 128 7168 16384 >> "$R/ncu_128_7168_16384.txt" 2>&1
  el "3. ncu rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__|lts__|sm__cycles" "$R/ncu_128_7168_16384.txt" | cut -c1-150
fi
el "done"
pack
