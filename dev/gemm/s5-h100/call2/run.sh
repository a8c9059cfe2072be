#!/usr/bin/env bash
# gemm5 (session 5) device call: CPU kernel tests, test_kernels_gpu (incl. the new 256x128 tests),
# test_moe_gpu, then gemm_bench dense at M = 4096 with every variant in the rotated alternation
# (heuristic, 128x128 direct/tma_store, 256x128 direct/tma_store, 128x128 pairs, tail4 at N=2112,
# cuBLASLt blockwise). Args: $1 = bench --m list (default 4096). One archive under $OUT.
set -uo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g5; rm -rf $W; mkdir -p $W $OUT
MS=${1:-4096}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh $W/
t0=$(date +%s)
./test_kernels > $W/test_kernels_cpu.log 2>&1; echo "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 200 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|differ|256x128" $W/test_kernels_gpu.log | head -40; echo "test_kernels_gpu rc=$rc ($(( $(date +%s) - t0 )) s)"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; mrc=$?; echo "test_moe_gpu rc=$mrc $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
FP8MOE_COMMIT=adcad14+gemm5 timeout 420 ./gemm_bench --only dense --m $MS --out $W/gemm.jsonl > $W/bench.log 2>&1; brc=$?
echo "bench rc=$brc ($(( $(date +%s) - t0 )) s)"
python3 summary.py $W/gemm.jsonl brief
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm5.tgz -C /tmp g5
exit $rc
