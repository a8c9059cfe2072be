#!/usr/bin/env bash
# gemm19 call 1 (session 11, one H100): what costs the gathered grouped GEMM its 14-17 %.
#   1. tests: the landed gathered tests, then producers 5 (warp pairs on alternate K blocks,
#      arrival as the copies land) and 6 (next tile's row index a tile ahead), each alone with a
#      timeout (a producer that fails or hangs is left out of the timings).
#   2. ncu --set full (clock control none) of one launch each: contiguous, landed gathered, landed
#      gathered on 128-byte aligned records (0a), at 8 x 4096 rows, 7168 x 2048 and 4096 x 7168
#      (gemm_bench --profile-gathered); details, raw metrics and the SASS source page per kernel.
#   3. gemm_bench --only gathered, 7 rounds, contiguous / landed / 0a / passed producers rotated.
# Output: $OUT/g19.tgz.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g19
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g19.tgz -C /tmp g19; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd "$H" || exit 1
cp BUILD_INFO.txt $W/
el "tests (landed)"
timeout 120 ./test_kernels_gpu \
  --gtest_filter='Fp8GemmGatheredGpu.EqualsContiguous*:Fp8GemmGatheredGpu.Rejects*:ScaleLayoutGpu.*' \
  > $W/tests.log 2>&1
el "tests (landed) rc $?"
tail -3 $W/tests.log
passed="0a"
for v in 5 6; do
  timeout 60 ./test_kernels_gpu --gtest_filter="Fp8GemmGatheredGpu.Producer${v}EqualsContiguous" \
    > $W/tests_p$v.log 2>&1
  rc=$?
  el "tests producer $v rc $rc"
  grep -E "OK \]|FAILED|mismatches=[1-9]" $W/tests_p$v.log | head -4
  [[ $rc -eq 0 ]] && passed="$passed,$v"
done
el "timed: $passed"
pack
if command -v ncu > /dev/null; then
  for shape in "8 4096 7168 2048" "8 4096 4096 7168"; do
    tag=$(echo $shape | tr ' ' _)
    el "ncu $tag"
    FP8MOE_BENCH_GATHER_PRODUCERS=0a timeout 150 ncu --set full --clock-control none \
      --kernel-name regex:fp8_gemm_kernel --launch-count 3 -o $W/prof_$tag \
      ./gemm_bench --profile-gathered $shape > $W/ncu_$tag.log 2>&1
    el "ncu $tag rc $?"
    tail -3 $W/ncu_$tag.log
    if [[ -f $W/prof_$tag.ncu-rep ]]; then
      ncu -i $W/prof_$tag.ncu-rep --print-details all > $W/details_$tag.txt 2>&1
      ncu -i $W/prof_$tag.ncu-rep --page raw --csv > $W/raw_$tag.csv 2>&1
      for i in 0 1 2; do
        ncu -i $W/prof_$tag.ncu-rep --page source --print-source sass --csv --launch-skip $i \
          --launch-count 1 > $W/src_${tag}_$i.csv 2> $W/src_${tag}_$i.err
      done
      gzip -f $W/src_${tag}_*.csv $W/raw_$tag.csv
      grep -E "fp8_gemm_kernel|Duration|Elapsed Cycles|SM Frequency" $W/details_$tag.txt | head -20
    fi
    pack
  done
else
  el "no ncu"
fi
el "bench"
FP8MOE_BENCH_GATHER_PRODUCERS=$passed FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 150 ./gemm_bench \
  --only gathered --out $W/gathered_run1.jsonl > $W/bench_run1.log 2>&1
el "bench rc $?"
grep -v "^gather_scales" $W/bench_run1.log | cut -c1-200
el "done"
pack
