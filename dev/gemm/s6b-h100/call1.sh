#!/usr/bin/env bash
# gemm9 (session 6b) device call 1: resident A (GemmTileConfig::resident_a = 2; 128x128 dense,
# one M-block, K <= 512: A loaded once per CTA, B-only stages, 7 of them). DenseResidentA first,
# then the lean small-M sweep (pick = session 6's, resident rows at K = 512 with 7 and 5 stages,
# cuBLASLt), 3 more runs of M = 128 32768x512 alone, then the whole test_kernels_gpu, test_moe_gpu.
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g9; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; el "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 60 ./test_kernels_gpu --gtest_filter='Fp8GemmGpu.DenseResidentA' > $W/test_resident.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_resident.log | head; grep -c rel_err $W/test_resident.log
grep -o "rel_err=[0-9.e-]*" $W/test_resident.log | sort | sed -n '1p;$p'
el "DenseResidentA rc=$rc"
S=128x128rq,128x128rs5q
FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$S FP8MOE_COMMIT=39448aa+gemm9 timeout 150 ./gemm_bench --only dense --m 128,64 --out $W/dense.jsonl > $W/bench_dense.log 2>&1; el "bench dense rc=$?"
grep -E "k=512 " $W/bench_dense.log | cut -c1-230
for i in 1 2 3; do
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$S FP8MOE_COMMIT=39448aa+gemm9 timeout 40 ./gemm_bench --only dense --m 128 --nk 32768x512 --out $W/rep$i.jsonl > $W/bench_rep$i.log 2>&1; el "rep $i rc=$?"
  grep -E "k=512 " $W/bench_rep$i.log | cut -c1-200
done
timeout 200 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_gpu.log | head -20
el "test_kernels_gpu rc=$rc"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; el "test_moe_gpu rc=$? $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm9_call1.tgz -C /tmp g9
el "done"
exit $rc
