#!/usr/bin/env bash
# gemm6 (session 5b) device call: CPU kernel tests, test_kernels_gpu (incl. the new 128x256 tests:
# DenseWideColumnTiles, GroupedWideColumnTiles, WideTilesRejectedWhereNotBuilt), test_moe_gpu,
# then gemm_bench dense at M = 128, 64 (every variant incl. forced 128x256/tma_store in a rotated
# alternation with cuBLASLt blockwise) and the grouped forms (heuristic pick vs 128x256/tma_store
# vs 128x128/tma_store, rotated alternation). Args: $1 = bench --m list (default 128,64).
set -uo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g6; rm -rf $W; mkdir -p $W $OUT
MS=${1:-128,64}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py $W/
t0=$(date +%s)
./test_kernels > $W/test_kernels_cpu.log 2>&1; echo "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 220 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|differ" $W/test_kernels_gpu.log | head -30
grep -E "128x256" $W/test_kernels_gpu.log | awk '{print $1, $2, $3, $4, $6}' | sort | uniq -c | sort -rn | head -3
grep -E "128x256|grouped_" $W/test_kernels_gpu.log | awk '{for(i=1;i<=NF;i++) if($i ~ /^rel_err=/) print $i}' | sort | tail -2
echo "test_kernels_gpu rc=$rc ($(( $(date +%s) - t0 )) s)"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; mrc=$?; echo "test_moe_gpu rc=$mrc $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
FP8MOE_COMMIT=3f6f146+gemm6 timeout 200 ./gemm_bench --only dense --m $MS --out $W/gemm_dense.jsonl > $W/bench_dense.log 2>&1; brc=$?
echo "bench dense rc=$brc ($(( $(date +%s) - t0 )) s)"
FP8MOE_COMMIT=3f6f146+gemm6 timeout 150 ./gemm_bench --only grouped --out $W/gemm_grouped.jsonl > $W/bench_grouped.log 2>&1; grc=$?
echo "bench grouped rc=$grc ($(( $(date +%s) - t0 )) s)"
python3 summary.py $W/gemm_dense.jsonl $W/gemm_grouped.jsonl
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm6.tgz -C /tmp g6
cp $W/bench_dense.log $W/bench_grouped.log $W/test_kernels_gpu.log $OUT/ 2>/dev/null
exit $rc
