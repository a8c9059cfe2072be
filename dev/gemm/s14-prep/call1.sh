#!/usr/bin/env bash
# Session 14, call 1 (prepared by gemm25 in late session 13): B rows in flight at small M.
# GemmTileConfig::b_fetch, the bytes of each B row asked of DRAM together, forced-only:
#   bf128 = B's tensor map fills L2 in 128-byte pieces (each K block's row alone);
#   (none) = today's 256-byte fills (L2 promotion 256 B: a block's load brings the next block too);
#   bf512 = 256-byte fills + the producer prefetches the same rows' next 256 bytes into L2 with the
#           load of every K block at a multiple of 4 (kernels with kModeBFetch512 | the B-scale
#           prefetch: 128x128 / 64x128 / 64x64, split-K or not).
# dev/gemm/NOTES.md "Session 13 late — B rows in flight at small M, prepared (gemm25)".
# Binaries: /work/main/build-gemm25/bins.tar.xz (stripped, BUILD_INFO.txt; this script is
# build-gemm25/run.sh). Call: run(kind="nvidia-h200", carry=["build-gemm25"],
#   command="bash build-gemm25/run.sh"); ~4-5 min wall expected.
#   1. test_kernels_gpu --gtest_filter='Fp8GemmGpuBFetch.*' alone under a timeout (bit-identical to
#      the plain kernels; a failing variant is still timed, its rows marked by the test log);
#   2. gemm_bench --only dense --m 128,64 (lean: picks + cuBLASLt + the forced rows below), twice;
#   3. if <= 330 s have passed: ncu (caches flushed, clocks not locked) of one launch each at
#      128 x 7168 x 16384: plain 128x128 split2 (H200's pick) vs bf512 vs bf128, 64x128 vs bf512,
#      and cuBLASLt: time, DRAM bytes and throughput, L2 hit rate.
# One archive back: $OUT/gemm25_call1.tgz (table.md by bfetch_table.py from the rows).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM25_BIN:-build-gemm25/bin} archive=build-gemm25/bins.tar.xz name=gemm25_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
tbl=$here/bfetch_table.py
[[ -f $tbl ]] || tbl=$root/dev/gemm/bfetch_table.py
cp build-gemm25/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1

timeout 150 "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGpuBFetch.*' > "$R/test_bfetch.log" 2>&1
el "1. Fp8GemmGpuBFetch rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|bit-identical checks" "$R/test_bfetch.log"
pack

# Each tile the option is built for, plain (with the B-scale prefetch, as the bf512 kernels have it)
# and with 512 / 128: split2 128x128 = H200's pick at 128x7168x16384; 64x128 = H100's pick there and
# the pick at 128x7168x2048, 64x24576x1536, 64x32768x512; 64x64 = 64x7168x16384, 128x4096x7168;
# 64x64 split2 = 64x4096x7168; 128x128 = 128x32768x512.
tiles=128x128k2w2q,128x128k2w2f512q,128x128k2w2f128q,64x128w2q,64x128w2f512q,64x128w2f128q
tiles+=,64x64w2q,64x64w2f512q,64x64k2w2q,64x64k2w2f512q,128x128w2q,128x128w2f512q
for run in 1 2; do
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles timeout 200 "$bin/gemm_bench" --only dense \
    --m 128,64 --out "$R/small_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 "$tbl" "$R"/small_run1.jsonl "$R"/small_run2.jsonl > "$R/table.md" 2>&1
grep -E "7168 \| 16384|bf512|bf128" "$R/table.md" | head -60
pack

if (( $(date +%s) - t0 <= 330 )) && command -v ncu > /dev/null; then
  # Only the metrics this ncu knows (an unknown name fails the whole run).
  ncu --query-metrics > "$R/ncu_metrics_known.txt" 2>&1
  metrics=""
  for m in gpu__time_duration.sum dram__bytes_read.sum dram__throughput.avg.pct_of_peak_sustained_elapsed \
    lts__t_sector_hit_rate.pct lts__t_sectors_srcunit_tex_op_read.sum \
    lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum lts__t_sectors_srcunit_tex_op_read_lookup_miss.sum \
    sm__cycles_active.max; do
    grep -qw -- "${m%%.*}" "$R/ncu_metrics_known.txt" && metrics+=${metrics:+,}$m
  done
  [[ -n $metrics ]] || metrics=gpu__time_duration.sum,dram__bytes_read.sum  # (used in session 7)
  echo "metrics: $metrics" > "$R/ncu_128_7168_16384.txt"
  FP8MOE_BENCH_PROFILE_TILES=128x128k2w2q,128x128k2w2f512q,128x128k2w2f128q,64x128w2q,64x128w2f512q \
    timeout 150 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' \
    --metrics "$metrics" "$bin/gemm_bench" --profile 128 7168 16384 >> "$R/ncu_128_7168_16384.txt" 2>&1
  el "3. ncu rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__|lts__|sm__cycles" "$R/ncu_128_7168_16384.txt" | cut -c1-150
fi
el "done"
pack
