#!/usr/bin/env bash
# gemm10 (session 7) device call 4: the final code again, asked as nvidia-h200 (calls 2-3 came as
# H100s): the new GPU tests; the lean M = 128 sweep with w1 rows (the same tiles without the
# B-scale prefetch); three repeats of 128x32768x512 and 128x7168x16384 (w1 rows of 128x128,
# 64x128 and 128x128 split2).
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g10; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 120 ./test_kernels_gpu --gtest_filter='Fp8GemmGpu.DenseScalePrefetch:Fp8GemmGpuPdl.*:Fp8GemmGpu.DenseDeepSeekShapesSmallM' > $W/test_new_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_new_gpu.log | head -10
el "GPU tests rc=$rc"
B="FP8MOE_COMMIT=921936a+gemm10 FP8MOE_BENCH_LEAN=1"
env $B FP8MOE_BENCH_SMALL_TILES=128x128w1q,64x128w1q,64x64w1q,128x128k2w1q,64x64k2w1q timeout 150 ./gemm_bench --only dense --m 128 --out $W/m128.jsonl > $W/bench_m128.log 2>&1; el "bench m128 rc=$?"
python3 summary.py $W/m128.jsonl | grep -v "bf16\|tensor\|nosplit\|pdl1"
for rep in 1 2 3; do
  env $B FP8MOE_BENCH_SMALL_TILES=128x128w1q,64x128w1q,128x128k2w1q timeout 80 ./gemm_bench --only dense --m 128 --nk 32768x512,7168x16384 --out $W/rep$rep.jsonl > $W/bench_rep$rep.log 2>&1
done; el "repeats done"
python3 summary.py $W/rep*.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm10_call4.tgz -C /tmp g10
el "done"
exit $rc
