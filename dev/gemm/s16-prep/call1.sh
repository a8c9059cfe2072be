#!/usr/bin/env bash
# Session 16, call 1 (prepared by gemm26): A multicast across N-adjacent CTAs at small M.
# GemmTileConfig::cluster_n (forced only): clusters of 2 or 4 CTAs on adjacent N-blocks of one
# M-block and K slice; CTA 0 loads each A tile and its A scales once, TMA multicast into all
# (kernels with kModeMulticastA | the B-scale prefetch: 128x128 / 64x128 / 64x64, split-K or not).
# dev/gemm/NOTES.md "Session 16 — A multicast along N at small M, prepared (gemm26)".
# Binaries: build-gemm26/bins.tar.xz (stripped, BUILD_INFO.txt; this script is
# build-gemm26/run.sh). Call: run(kind="nvidia-h200", carry=["build-gemm26"],
#   command="bash build-gemm26/run.sh"); ~2-3 min wall expected, < 240 s by construction.
#   1. test_kernels_gpu --gtest_filter='Fp8GemmGpuMulticastA.*' alone under timeout 150 (against
#      the CPU reference and bit for bit against the same tile without the cluster);
#   2. gemm_bench --only dense --m 128,64 (lean: picks + cuBLASLt + the forced rows below), twice;
#   3. if <= 200 s have passed: ncu (caches flushed, clocks not locked) of one launch each at
#      128 x 7168 x 16384: the pick, 128x128 split2 plain / in clusters of 2 / of 4, cuBLASLt.
# One archive back: $OUT/gemm26_call1.tgz (table.md by mcast_table.py from the rows).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM26_BIN:-build-gemm26/bin} archive=build-gemm26/bins.tar.xz name=gemm26_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
tbl=$root/dev/gemm/mcast_table.py
cp build-gemm26/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1

timeout 150 "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGpuMulticastA.*' > "$R/test_mcast.log" 2>&1
el "1. Fp8GemmGpuMulticastA rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|^\[       OK" "$R/test_mcast.log"
pack

# Each tile the option is built for, plain (with the B-scale prefetch, as the multicast kernels
# have it) and in clusters of 2 / 4 (n2 / n4): 128x128 split2 = H200's pick at 128x7168x16384
# (cuBLASLt's nvjet: 128x128 split-K in 4x1 clusters); 128x128 = the pick at 128x32768x512;
# 64x128 = H100's pick at 128x7168x16384 and the pick at several M = 64 shapes; 64x64 (split2) =
# 64x7168x16384, 128x4096x7168 (64x4096x7168).
tiles=128x128k2w2q,128x128k2w2n2q,128x128k2w2n4q,128x128w2q,128x128w2n2q,128x128w2n4q
tiles+=,64x128w2q,64x128w2n2q,64x128w2n4q,64x64w2q,64x64w2n4q,64x64k2w2q,64x64k2w2n4q
for run in 1 2; do
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles timeout 75 "$bin/gemm_bench" --only dense \
    --m 128,64 --out "$R/small_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 "$tbl" "$R"/small_run1.jsonl "$R"/small_run2.jsonl > "$R/table.md" 2>&1
head -40 "$R/table.md"
pack

left=$((235 - ($(date +%s) - t0)))
if (( $(date +%s) - t0 <= 200 )) && command -v ncu > /dev/null; then
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
  FP8MOE_BENCH_PROFILE_TILES=128x128k2w2q,128x128k2w2n2q,128x128k2w2n4q \
    timeout $((left - 5)) ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' \
    --metrics "$metrics" "$bin/gemm_bench" --profile 128 7168 16384 >> "$R/ncu_128_7168_16384.txt" 2>&1
  el "3. ncu rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__|lts__|sm__cycles" "$R/ncu_128_7168_16384.txt" | cut -c1-150
fi
el "done"
pack
