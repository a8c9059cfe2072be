#!/usr/bin/env bash
# Session 18, call 1 (prepared by gemm29 in session 17 late): 128x112 tiles for the small-M dense
# GEMM, split-K (forced only: two math warpgroups of m64n112; 7168 / 112 = 64 tiles x split2 = 128
# units on 132 SMs, cuBLASLt's nvjet 112x128 split-K form). dev/gemm/NOTES.md "Session 17 late —
# 112-wide split-K tiles, prepared (gemm29)". Binaries: build-gemm29/bins.tar.xz (stripped;
# BUILD_INFO.txt; this script is build-gemm29/run.sh, a copy of dev/gemm/s17-gemm29/call1.sh).
# Call:
#   run(kind="nvidia-h200", carry=["build-gemm29"], command="bash build-gemm29/run.sh")
#   1. test_kernels_gpu --gtest_filter='Fp8GemmGpu128x112.*' under timeout 120 (against the CPU
#      reference and bit for bit against 128x128 of the same split);
#   2. gemm_bench --only dense --m 128,64 (lean: picks + cuBLASLt + the forced rows below), twice
#      (timeout 60 each, less if the wall budget is short); table.md by tile112_table.py;
#   3. if <= 170 s have passed: ncu (caches flushed, clocks not locked, gemm28's metric list) of
#      one launch each at 128 x 7168 x 16384: the pick (H200: 128x128 split2), 128x112 split2 and
#      split3, 128x112 unsplit, cuBLASLt (its kernels are named nvjet).
# Everything bounded so the call ends < 220 s wall. One archive back: $OUT/gemm29_call1.tgz.
# GEMM29_SKIP_TESTS=1 skips step 1 (a second card after the test passed on the first).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM29_BIN:-build-gemm29/bin} archive=build-gemm29/bins.tar.xz name=gemm29_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
tbl=$root/dev/gemm/tile112_table.py
[[ -f $tbl ]] || tbl=$root/build-gemm29/tile112_table.py  # (a tree without gemm29's commit)
cp build-gemm29/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
# Seconds a step may take: its nominal limit, cut to what is left of a 212 s budget.
budget() { local left=$((212 - ($(date +%s) - t0))); echo $((left < 1 ? 1 : ($1 < left ? $1 : left))); }

if [[ -z ${GEMM29_SKIP_TESTS:-} ]]; then
  timeout "$(budget 120)" "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGpu128x112.*' \
    > "$R/test_128x112.log" 2>&1
  el "1. Fp8GemmGpu128x112 rc=$?"
  grep -E "^\[  (PASSED|FAILED)|FAILED  \]|^\[       OK|not the 128x128|Failure|SKIPPED" \
    "$R/test_128x112.log" | sort -u | head -20
  pack
fi

# 128x112: e1 (registers: the only epilogue it has), unsplit with the B-scale prefetch off (w1)
# and on (w2), split2 and split3 with it (w2, the split default); beside 128x128 split2 (the H200
# pick at 128 x 7168 x 16384) and 128x64 (the H100 pick there).
tiles=128x112e1w1q,128x112e1w2q,128x112k2w2q,128x112k3w2q,128x128k2w2q,128x64e0w1q
for run in 1 2; do
  lim=$(budget 60)
  if ((lim < 20)); then el "2. bench run $run skipped (${lim} s left)"; continue; fi
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles timeout "$lim" "$bin/gemm_bench" \
    --only dense --m 128,64 --out "$R/small_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 "$tbl" "$R"/small_run*.jsonl > "$R/table.md" 2>&1
sed -n '/^## Focus/,/^$/p' "$R/table.md" | head -12
grep -A14 "N x K = 7168 x 16384" "$R/table.md" | head -34
pack

if (($(date +%s) - t0 <= 170)) && command -v ncu > /dev/null; then
  left=$(budget 40)
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
  FP8MOE_BENCH_PROFILE_TILES=128x112k2w2q,128x112k3w2q,128x112e1w1q,128x128k2w2q \
    timeout "$((left > 4 ? left - 3 : 1))" ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' \
    --metrics "$metrics" "$bin/gemm_bench" --profile 128 7168 16384 >> "$R/ncu_128_7168_16384.txt" 2>&1
  el "3. ncu rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__|lts__|sm__cycles" "$R/ncu_128_7168_16384.txt" | cut -c1-150
fi
el "done"
pack
