#!/usr/bin/env bash
# gemm7 (session 5c) device call: CPU kernel tests, test_kernels_gpu (the wide-tile CTA-pair
# tests DenseWideTiles / DenseWideColumnTiles / GroupedWideColumnTilePairs, every other GEMM test
# but the two long ones whose kernels are unchanged (DenseDeepSeekShapesSmallM,
# SplitK.MatchesReferenceOnDeepSeekShapes); the split-K repeated-run test stays), test_moe_gpu,
# then gemm_bench dense M=4096 (256x128/tma_store single vs pair, rotated alternation with
# cuBLASLt) and grouped contiguous (128x256/tma_store single vs pair). Filters per binary
# (GTEST_FILTER in the environment would apply to every binary).
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g7; rm -rf $W; mkdir -p $W $OUT
MS=${1:-4096}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py $W/
t0=$(date +%s)
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; echo "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 100 ./test_kernels_gpu --gtest_filter='-Fp8GemmGpu.DenseDeepSeekShapesSmallM:Fp8GemmGpuSplitK.MatchesReferenceOnDeepSeekShapes' > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|differ|^\[       OK" $W/test_kernels_gpu.log | head -40
grep -E "/pair" $W/test_kernels_gpu.log | awk '{for(i=1;i<=NF;i++) if($i ~ /^rel_err=/) print $i}' | sort | sed -n '1p;$p'
echo "pair lines: $(grep -c '/pair' $W/test_kernels_gpu.log)"
echo "test_kernels_gpu rc=$rc ($(( $(date +%s) - t0 )) s)"
if [ $rc -ne 0 ]; then tar czf $OUT/gemm7.tgz -C /tmp g7; cp $W/test_kernels_gpu.log $OUT/; echo "GPU tests failed: no bench"; exit $rc; fi
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; mrc=$?; echo "test_moe_gpu rc=$mrc $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
FP8MOE_GEMM_VERBOSE=1 FP8MOE_COMMIT=dcab494+gemm7 timeout 110 ./gemm_bench --only dense --m $MS --out $W/gemm_dense.jsonl > $W/bench_dense.log 2>&1; brc=$?
echo "bench dense rc=$brc ($(( $(date +%s) - t0 )) s)"
FP8MOE_GEMM_VERBOSE=1 FP8MOE_COMMIT=dcab494+gemm7 timeout 70 ./gemm_bench --only contiguous --out $W/gemm_grouped.jsonl > $W/bench_grouped.log 2>&1; grc=$?
echo "bench contiguous rc=$grc ($(( $(date +%s) - t0 )) s)"
grep -h "CTA pairs can be resident" $W/bench_dense.log $W/bench_grouped.log | sort | uniq
python3 summary.py $W/gemm_dense.jsonl $W/gemm_grouped.jsonl
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm7.tgz -C /tmp g7
cp $W/bench_dense.log $W/bench_grouped.log $W/test_kernels_gpu.log $OUT/ 2>/dev/null
exit $rc
