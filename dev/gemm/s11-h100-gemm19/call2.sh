#!/usr/bin/env bash
# gemm19 call 2 (session 11, one H100): the record alignment and the row-index prefetch, two runs.
#   1. test_kernels_gpu: the gathered tests and producers 5, 6 (kernels as call 1: PTX identical).
#   2. gemm_bench --only gathered, twice, 7 rounds, rotated in one process at the four grouped
#      picks: contiguous, landed gathered (bench records, stride 7408 / 2128), 0a (landed producer,
#      128-byte aligned records: 7424 / 2176), 0e (landed producer, the EP dispatch's own stride:
#      7392 / 2112), 6 (row index a tile ahead, bench records), 6a (the same, aligned records).
#   3. forced 128x128 (5 rounds): contiguous, landed, 0a, 0e.
#   4. ncu --set full, 8 x 4096 rows, 7168 x 2048: contiguous, landed, 0e, 6a.
# Output: $OUT/g19b.tgz.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g19b
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g19b.tgz -C /tmp g19b; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd "$H" || exit 1
cp BUILD_INFO.txt $W/
el "tests"
timeout 120 ./test_kernels_gpu --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*' \
  > $W/tests.log 2>&1
el "tests rc $?"
grep -E "^\[  (PASSED|FAILED)|OK \]|FAILED" $W/tests.log | head -12
for run in 1 2; do
  el "bench run $run"
  FP8MOE_BENCH_GATHER_PRODUCERS=0a,0e,6,6a FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 150 \
    ./gemm_bench --only gathered --out $W/gathered_run$run.jsonl > $W/bench_run$run.log 2>&1
  el "bench run $run rc $?"
  grep -v "^gather_scales" $W/bench_run$run.log | cut -c1-150
  pack
done
el "bench forced 128x128"
FP8MOE_BENCH_GATHER_PRODUCERS=0a,0e FP8MOE_BENCH_GROUPED_ROUNDS=5 \
  FP8MOE_BENCH_GATHERED_TILES=128x128q timeout 150 ./gemm_bench --only gathered \
  --out $W/gathered_forced.jsonl > $W/bench_forced.log 2>&1
el "bench forced rc $?"
pack
if command -v ncu > /dev/null; then
  tag=8_4096_7168_2048
  el "ncu $tag"
  FP8MOE_BENCH_GATHER_PRODUCERS=0e,6a timeout 100 ncu --set full --clock-control none \
    --kernel-name regex:fp8_gemm_kernel --launch-count 4 -o $W/prof_$tag \
    ./gemm_bench --profile-gathered 8 4096 7168 2048 > $W/ncu_$tag.log 2>&1
  el "ncu rc $?"
  if [[ -f $W/prof_$tag.ncu-rep ]]; then
    ncu -i $W/prof_$tag.ncu-rep --page raw --csv > $W/raw_$tag.csv 2>&1
    for i in 0 1 2 3; do
      ncu -i $W/prof_$tag.ncu-rep --page source --print-source sass --csv --launch-skip $i \
        --launch-count 1 > $W/src_${tag}_$i.csv 2> $W/src_${tag}_$i.err
    done
    gzip -f $W/src_${tag}_*.csv $W/raw_$tag.csv
    rm -f $W/prof_$tag.ncu-rep
  fi
fi
el "done"
pack
