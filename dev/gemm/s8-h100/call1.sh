#!/usr/bin/env bash
# gemm12 (session 8) device call 1: 256x128 tiles for the grouped forms (kModeGroupedRows).
# 1. the grouped GPU tests (new GroupedRowPairTiles + the existing grouped / rejection tests);
# 2. A/B, same call: grouped bench, rows = heuristic pick (128x256/tma_store) + forced 256x128 +
#    forced 128x256 (identical to the pick), 4 rotated rounds, all ten grouped shapes;
# 3. dense control: M = 4096, 4096x7168 and 7168x2048, the usual wide-tile rows + 128x256 forced;
# 4. the whole test_kernels_gpu, test_moe_gpu and the CPU kernel tests.
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g12; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
timeout 120 ./test_kernels_gpu --gtest_filter='Fp8GemmGpu.Grouped*:Fp8GemmGpu.WideTilesRejectedWhereNotBuilt' > $W/test_grouped.log 2>&1; rcg=$?
grep -E "^\[ *(FAILED|PASSED|  OK) *\]|Failure|rel_err" $W/test_grouped.log | head -60
el "grouped tests rc=$rcg"
B="FP8MOE_COMMIT=ede31d3+gemm12"
env $B FP8MOE_BENCH_GROUPED_TILES=256x128q,128x256q FP8MOE_BENCH_GROUPED_ROUNDS=4 timeout 240 ./gemm_bench --only grouped --out $W/grouped.jsonl > $W/bench_grouped.log 2>&1; el "bench grouped rc=$?"
python3 summary.py $W/grouped.jsonl
env $B FP8MOE_BENCH_DENSE_TILES=128x256q timeout 150 ./gemm_bench --only dense --m 4096 --nk 4096x7168,7168x2048 --out $W/dense.jsonl > $W/bench_dense.log 2>&1; el "bench dense rc=$?"
python3 summary.py $W/dense.jsonl | grep -v "bf16\|tensor"
rc=0; rc2=0
if [ $rcg -eq 0 ]; then
  timeout 200 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
  grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_gpu.log | head -20
  el "test_kernels_gpu (all) rc=$rc"
  timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; rc2=$?; el "test_moe_gpu rc=$rc2 $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
  ./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; el "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
fi
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm12_call1.tgz -C /tmp g12
el "done"
[ $rcg -ne 0 ] && exit $rcg
[ $rc -ne 0 ] && exit $rc
exit $rc2
