#!/usr/bin/env bash
# gemm10 (session 7) device call 5, the final code (B-scale prefetch on by default for dense
# 128x128 and split-K launches at M <= 128; nvidia-h200 asked, H100 or H200 whichever comes): CPU
# kernel tests; the whole test_kernels_gpu; test_moe_gpu; the plain dense sweep M = 128, 64 (lean:
# pick = the final default; forced rows w1 = 128x128 / 64x64 split without the prefetch, w2 =
# 64x128 / 64x64 with it, whose default is off; 128x128 split2 with (default) and without; M = 4096 left out: its picks are 256x128 kernels,
# PTX unchanged, and the prefetch is off above M = 128).
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
timeout 200 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_gpu.log | head -20
el "test_kernels_gpu (all) rc=$rc"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; rc2=$?; el "test_moe_gpu rc=$rc2 $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
B="FP8MOE_COMMIT=921936a+gemm10 FP8MOE_BENCH_LEAN=1"
env $B FP8MOE_BENCH_SMALL_TILES=128x128w1q,64x128w2q,64x64w2q,64x64k2w1q,64x64k4w1q,128x128k2q,128x128k2w1q timeout 200 ./gemm_bench --only dense --m 128,64 --out $W/dense.jsonl > $W/bench_dense.log 2>&1; el "bench dense rc=$?"
python3 summary.py $W/dense.jsonl | grep -v "bf16\|tensor\|nosplit\|pdl1"
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm10_call5.tgz -C /tmp g10
el "done"
[ $rc -ne 0 ] && exit $rc
exit $rc2
