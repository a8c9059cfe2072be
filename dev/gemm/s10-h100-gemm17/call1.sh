#!/usr/bin/env bash
# gemm17 call 1 (session 10, H100): the gathered grouped contiguous GEMM.
#   1. test_kernels_gpu: Fp8GemmGatheredGpu.* (bit for bit against the contiguous GEMM on the
#      materialised rows; rejections), ScaleLayoutGpu.* (the scale gather against a CPU loop),
#      Fp8GemmGpu.GroupedContiguous* (the contiguous kernels, unchanged PTX).
#   2. gemm_bench --only gathered, twice (7 alternated rounds each): contiguous on the
#      materialised rows vs gathered on the records, 4 x 8192 and 8 x 4096 rows, N x K =
#      4096 x 7168 and 7168 x 2048; outputs checked bit for bit in the bench; the scale gather.
# Output: $OUT/g17_call1.tgz.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g17
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g17_call1.tgz -C /tmp g17; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd "$H" || exit 1
cp BUILD_INFO.txt $W/
el "tests"
timeout 240 ./test_kernels_gpu \
  --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*:Fp8GemmGpu.GroupedContiguous*' \
  > $W/tests.log 2>&1
el "tests rc $?"
tail -25 $W/tests.log
pack
for run in 1 2; do
  el "bench run $run"
  FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 150 ./gemm_bench --only gathered \
    --out $W/gathered_run$run.jsonl > $W/bench_run$run.log 2>&1
  el "bench run $run rc $?"
  cat $W/bench_run$run.log
  pack
done
el "done"
pack
