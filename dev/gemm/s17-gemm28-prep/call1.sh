#!/usr/bin/env bash
# Session 17, call 1 (prepared by gemm28): 128x64 tiles for the small-M dense GEMM (forced only:
# two math warpgroups of m64n64; 112 CTAs at M = 128, N = 7168 each stream 64 B rows over the
# whole K, the M = 64 64x64 pick's B pattern). dev/gemm/NOTES.md "Session 17 — 128x64 tiles at
# small M, prepared (gemm28)". Binaries: build-gemm28/bins.tar.xz (stripped; BUILD_INFO.txt; this
# script is build-gemm28/run.sh, a copy of dev/gemm/s17-gemm28-prep/call1.sh). Call:
#   run(kind="nvidia-h200", carry=["build-gemm28"], command="bash build-gemm28/run.sh")
#   1. test_kernels_gpu --gtest_filter='Fp8GemmGpu128x64.*' under timeout 120 (against the CPU
#      reference and bit for bit against 64x64 of the same form);
#   2. gemm_bench --only dense --m 128,64 (lean: picks + cuBLASLt + the forced rows below), twice
#      (timeout 70 each, less if the wall budget is short); table.md by tile128x64_table.py;
#   3. if <= 165 s have passed: ncu (caches flushed, clocks not locked, gemm26's metric list) of
#      one launch each at 128 x 7168 x 16384: the pick, 128x64 (prefetch on / off), 128x128
#      split2, cuBLASLt.
# Everything bounded so the call ends < 220 s wall. One archive back: $OUT/gemm28_call1.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM28_BIN:-build-gemm28/bin} archive=build-gemm28/bins.tar.xz name=gemm28_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
tbl=$root/dev/gemm/tile128x64_table.py
[[ -f $tbl ]] || tbl=$root/build-gemm28/tile128x64_table.py  # (a tree without gemm28's commit)
cp build-gemm28/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
# Seconds a step may take: its nominal limit, cut to what is left of a 212 s budget.
budget() { local left=$((212 - ($(date +%s) - t0))); echo $((left < 1 ? 1 : ($1 < left ? $1 : left))); }

timeout "$(budget 120)" "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGpu128x64.*' \
  > "$R/test_128x64.log" 2>&1
el "1. Fp8GemmGpu128x64 rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|^\[       OK|not the 64x64|Failure" "$R/test_128x64.log" | sort -u | head -20
pack

# 128x64: e0 = the heuristic's epilogue choice (TMA store at K <= 3072), B-scale prefetch off (w1,
# its default unsplit) and on (w2), split2 with it; beside the current picks' tiles: 128x128 split2
# (H200 pick at 128 x 7168 x 16384), 64x128 (H100's there), 64x64 (the M = 64 pick), 64x64 split2.
tiles=128x64e0w1q,128x64e0w2q,128x64k2w2q,128x128k2w2q,64x128e0q,64x64e0q,64x64k2w2q
for run in 1 2; do
  lim=$(budget 70)
  if ((lim < 20)); then el "2. bench run $run skipped (${lim} s left)"; continue; fi
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles timeout "$lim" "$bin/gemm_bench" \
    --only dense --m 128,64 --out "$R/small_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 "$tbl" "$R"/small_run*.jsonl > "$R/table.md" 2>&1
grep -A14 "7168 x 16384" "$R/table.md" | head -34
pack

if (($(date +%s) - t0 <= 165)) && command -v ncu > /dev/null; then
  left=$(budget 45)
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
  FP8MOE_BENCH_PROFILE_TILES=128x64e0w2q,128x64e0w1q,128x128k2w2q \
    timeout "$((left > 4 ? left - 3 : 1))" ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' \
    --metrics "$metrics" "$bin/gemm_bench" --profile 128 7168 16384 >> "$R/ncu_128_7168_16384.txt" 2>&1
  el "3. ncu rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__|lts__|sm__cycles" "$R/ncu_128_7168_16384.txt" | cut -c1-150
fi
el "done"
pack
