#!/usr/bin/env bash
# gemm18 prep (session 10 late, for session 11's first single-GPU call, H100): the gathered
# grouped GEMM's producer variants (GemmTileConfig::gather_producer 1..4: one poller + one arrival
# per stage, two copy warps, both, one arrival per warp; sm90_fp8_gemm.cuh
# produce_gathered_variant) against the landed producer and the contiguous GEMM, same process.
# Binaries: main e9f2086 + dev/gemm/s11-prep/gathered_producers.patch (BUILD_INFO.txt). Run with
# carry ["build-gemm18"], command `bash build-gemm18/run.sh` (~3-4 min wall after the start).
#   1. test_kernels_gpu: the landed gathered tests and ScaleLayoutGpu.*, then each variant's test
#      (Fp8GemmGatheredGpu.Producer<p>EqualsContiguous, bit for bit against the contiguous GEMM on
#      the materialised rows) on its own with a timeout: a variant that fails or hangs is left out
#      of the timings, the others are timed.
#   2. gemm_bench --only gathered with FP8MOE_BENCH_GATHER_PRODUCERS=<those that passed>, twice
#      (7 rounds): contiguous, landed gathered and the variants rotated at the four grouped shapes
#      (the 128x256 picks); then forced 128x128 and 128x256e1 (5 rounds).
# Output: $OUT/g18.tgz (steps.log, tests*.log, bench logs and jsonl rows).
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g18
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g18.tgz -C /tmp g18; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd "$H" || exit 1
cp BUILD_INFO.txt $W/
el "tests (landed)"
timeout 180 ./test_kernels_gpu \
  --gtest_filter='Fp8GemmGatheredGpu.EqualsContiguous*:Fp8GemmGatheredGpu.Rejects*:ScaleLayoutGpu.*' \
  > $W/tests.log 2>&1
el "tests (landed) rc $?"
tail -6 $W/tests.log
passed=""
for v in 1 2 3 4; do
  timeout 90 ./test_kernels_gpu --gtest_filter="Fp8GemmGatheredGpu.Producer${v}EqualsContiguous" \
    > $W/tests_p$v.log 2>&1
  rc=$?
  el "tests producer $v rc $rc"
  grep -E "OK|FAILED|mismatches=[1-9]" $W/tests_p$v.log | head -4
  [[ $rc -eq 0 ]] && passed="$passed${passed:+,}$v"
done
el "producers passed: ${passed:-none}"
pack
if [[ -z "$passed" ]]; then
  el "no variant passed: no timing"
  exit 1
fi
for run in 1 2; do
  el "bench run $run"
  FP8MOE_BENCH_GATHER_PRODUCERS=$passed FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 200 ./gemm_bench \
    --only gathered --out $W/gathered_run$run.jsonl > $W/bench_run$run.log 2>&1
  el "bench run $run rc $?"
  grep -v "^gather_scales" $W/bench_run$run.log
  pack
done
el "bench forced 128x128 / 128x256e1"
FP8MOE_BENCH_GATHER_PRODUCERS=$passed FP8MOE_BENCH_GROUPED_ROUNDS=5 \
  FP8MOE_BENCH_GATHERED_TILES=128x128q,128x256e1q timeout 240 ./gemm_bench --only gathered \
  --out $W/gathered_forced.jsonl > $W/bench_forced.log 2>&1
el "bench forced rc $?"
grep -v "^gemm_bench" $W/bench_forced.log | grep -v "^gather_scales"
el "done"
pack
