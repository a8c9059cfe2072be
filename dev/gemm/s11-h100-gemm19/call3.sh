#!/usr/bin/env bash
# gemm19 call 3 (session 11, one H100): the final tree's gemm_bench (gathered rows on the EP
# dispatch's record stride by default; FP8MOE_BENCH_GATHER_RECORDS=a,h adds 128-byte stride and
# the old 16-byte-header stride), 7 rounds, one run; and the gathered GPU tests (kernels = main's).
# Output: $OUT/g19c.tgz.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g19c
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cd "$H" || exit 1
cp BUILD_INFO.txt $W/
el "tests"
timeout 120 ./test_kernels_gpu --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*' > $W/tests.log 2>&1
el "tests rc $?"
tail -1 $W/tests.log
el "bench"
FP8MOE_BENCH_GATHER_RECORDS=a,h FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 150 ./gemm_bench \
  --only gathered --out $W/gathered_run3.jsonl > $W/bench_run3.log 2>&1
el "bench rc $?"
cut -c1-140 $W/bench_run3.log
el "done"
tar czf $OUT/g19c.tgz -C /tmp g19c
