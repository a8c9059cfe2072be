#!/usr/bin/env bash
# gemm10 (session 7) device call 3 (the final code; nvidia-h200 asked, H100 or H200 whichever
# comes): CPU kernel tests; the whole test_kernels_gpu (new: Fp8GemmGpu.DenseScalePrefetch, PDL
# chains with and without the B-scale prefetch; every dense test at M <= 128 now runs the prefetch
# kernels by default, split-K ones too); test_moe_gpu; the plain dense sweep M = 128, 64 (lean: pick = the new
# default, with forced rows w1 = the same tiles without the B-scale prefetch, as before this
# session; M = 4096 left out: its picks are 256x128 kernels, PTX unchanged, and the prefetch is off
# above M = 128); three more repeats of 128x32768x512 and 128x7168x16384.
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g10; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; el "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 60 ./test_kernels_gpu --gtest_filter='Fp8GemmGpu.DenseScalePrefetch:Fp8GemmGpuPdl.*' > $W/test_new_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_new_gpu.log | head -10
awk '/rel_err/ {split($0,a,"rel_err="); split(a[2],b," "); if (b[1]+0 > mx) mx=b[1]+0; n++} END {print n, "checks, max rel_err", mx}' $W/test_new_gpu.log
el "new GPU tests rc=$rc"
if [ $rc -ne 0 ]; then cp $W/*.log $OUT/; echo "new GPU tests failed: stop"; exit $rc; fi
B="FP8MOE_COMMIT=921936a+gemm10 FP8MOE_BENCH_LEAN=1"
env $B FP8MOE_BENCH_SMALL_TILES=128x128w1q,64x128w1q,64x64w1q,128x128k2w1q,64x64k2w1q,64x64k4w1q timeout 240 ./gemm_bench --only dense --m 128,64 --out $W/dense.jsonl > $W/bench_dense.log 2>&1; el "bench dense rc=$?"
python3 summary.py $W/dense.jsonl | grep -v "bf16\|tensor\|nosplit"
for rep in 1 2 3; do
  env $B FP8MOE_BENCH_SMALL_TILES=128x128w1q,64x128w1q,128x128k2w1q timeout 80 ./gemm_bench --only dense --m 128 --nk 32768x512,7168x16384 --out $W/rep$rep.jsonl > $W/bench_rep$rep.log 2>&1
done; el "repeats done"
python3 summary.py $W/rep*.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
timeout 200 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_gpu.log | head -20
el "test_kernels_gpu (all) rc=$rc"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; rc2=$?; el "test_moe_gpu rc=$rc2 $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm10_call3.tgz -C /tmp g10
el "done"
[ $rc -ne 0 ] && exit $rc
exit $rc2
