#!/usr/bin/env bash
# Session 12, gemm21 call 1: the landed gathered producer measured on H100 for the first time, beside
# three variants (GemmTileConfig::gather_producer 1 = next tile's loads a tile ahead, 2 = thread 0's
# TMA after its copies, 3 = both; dev/gemm/NOTES.md "Session 12 — gemm21"), one GPU.
# Binaries: /work/main/build-gemm21/ (stripped, BUILD_INFO.txt; this script is build-gemm21/run.sh).
# Call: run(kind="nvidia-h100-x1", carry=["build-gemm21"], command="bash build-gemm21/run.sh")
#   1. test_kernels_gpu: Producer{1,2,3}EqualsContiguous each alone under a timeout (a variant that
#      fails or hangs is not timed), then the other gathered tests;
#   2. gemm_bench --only gathered, twice, 7 rounds, rotated in one process at the four grouped
#      picks on the EP's record stride: contiguous, landed gathered, the passing variants;
#   3. forced 128x256e1 (4 stages: depth 2), 5 rounds;
#   4. ncu (--set full) of one launch each at 8 x 4096, 7168 x 2048 (if time is left).
# One archive back: $OUT/gemm21_call1.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM21_BIN:-build-gemm21} archive=build-gemm21/bins.tar.xz name=gemm21_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp "$bin/BUILD_INFO.txt" "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
producers=""
for v in 1 2 3; do
  timeout 90 "$bin/test_kernels_gpu" --gtest_filter="Fp8GemmGatheredGpu.Producer${v}EqualsContiguous" \
    > "$R/test_p$v.log" 2>&1
  rc=$?
  el "1. Producer${v}EqualsContiguous rc=$rc"; grep -E "^\[  (PASSED|FAILED)" "$R/test_p$v.log"
  [[ $rc == 0 ]] && producers+=$v
done
timeout 150 "$bin/test_kernels_gpu" \
  --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*:-Fp8GemmGatheredGpu.Producer*' \
  > "$R/tests.log" 2>&1
el "1. gathered tests rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/tests.log"
pack
for run in 1 2; do
  FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 170 \
    "$bin/gemm_bench" --only gathered --out "$R/gathered_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=5 \
  FP8MOE_BENCH_GATHERED_TILES=128x256e1q timeout 150 "$bin/gemm_bench" --only gathered \
  --out "$R/gathered_forced.jsonl" > "$R/bench_forced.log" 2>&1
el "3. bench forced 128x256e1 rc=$?"
python3 dev/gemm/variants_table.py "$R"/gathered_run1.jsonl "$R"/gathered_run2.jsonl \
  "$R"/gathered_forced.jsonl > "$R/table.md" 2>&1
cat "$R/table.md"
pack
if command -v ncu > /dev/null && (( $(date +%s) - t0 < 330 )); then
  tag=8_4096_7168_2048
  FP8MOE_BENCH_GATHER_PRODUCERS=$producers timeout 150 ncu --set full --clock-control none \
    --kernel-name regex:fp8_gemm_kernel --launch-count 5 -o "$R/prof_$tag" \
    "$bin/gemm_bench" --profile-gathered 8 4096 7168 2048 > "$R/ncu_$tag.log" 2>&1
  el "4. ncu rc=$?"
  if [[ -f $R/prof_$tag.ncu-rep ]]; then
    ncu -i "$R/prof_$tag.ncu-rep" --page raw --csv > "$R/raw_$tag.csv" 2>&1
    for i in 1 2 3 4; do
      ncu -i "$R/prof_$tag.ncu-rep" --page source --print-source sass --csv --launch-skip $i \
        --launch-count 1 > "$R/src_${tag}_$i.csv" 2> "$R/src_${tag}_$i.err"
    done
    gzip -f "$R"/src_"${tag}"_*.csv "$R/raw_$tag.csv"
    rm -f "$R/prof_$tag.ncu-rep"
  fi
fi
el "done"
pack
