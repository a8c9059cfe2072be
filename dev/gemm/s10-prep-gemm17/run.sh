#!/usr/bin/env bash
# gemm17 prep (session 10, for a later single-GPU call, H100): the gathered grouped GEMM's noinc
# producer (kModeGatherNoinc: each producer thread's cp.async copies arrive on the full barrier as
# they land, cp.async.mbarrier.arrive.noinc; the math warps fence the async proxy after each
# full-barrier wait) against the landed writer-side producer and the contiguous GEMM, same run.
# Binaries: gemm17's tree + dev/gemm/s10-prep-gemm17/noinc.patch (BUILD_INFO.txt). Run with carry
# ["build-gemm17-next"], command `bash build-gemm17-next/run.sh` (~60 s wall after the start).
#   1. test_kernels_gpu Fp8GemmGatheredGpu.* (both producers bit for bit against the contiguous
#      GEMM on the materialised rows), ScaleLayoutGpu.*.
#   2. gemm_bench --only gathered with FP8MOE_BENCH_GATHER_NOINC=1, twice (7 rounds): contiguous,
#      gathered (writer-side), gathered (noinc) rotated; then forced 128x256e1 and 128x128.
# Output: $OUT/g17_next.tgz.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g17n
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g17_next.tgz -C /tmp g17n; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd "$H" || exit 1
cp BUILD_INFO.txt $W/
el "tests"
timeout 240 ./test_kernels_gpu --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*' > $W/tests.log 2>&1
el "tests rc $?"
tail -12 $W/tests.log
pack
for run in 1 2; do
  el "bench run $run"
  FP8MOE_BENCH_GATHER_NOINC=1 FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 150 ./gemm_bench \
    --only gathered --out $W/gathered_run$run.jsonl > $W/bench_run$run.log 2>&1
  el "bench run $run rc $?"
  grep -v "^gather_scales" $W/bench_run$run.log
  pack
done
el "bench forced 128x256e1 / 128x128"
FP8MOE_BENCH_GATHER_NOINC=1 FP8MOE_BENCH_GROUPED_ROUNDS=5 \
  FP8MOE_BENCH_GATHERED_TILES=128x128q,128x256e1q timeout 200 ./gemm_bench --only gathered \
  --out $W/gathered_forced.jsonl > $W/bench_forced.log 2>&1
el "bench forced rc $?"
grep -v "^gemm_bench" $W/bench_forced.log | grep -v "^gather_scales"
el "done"
pack
