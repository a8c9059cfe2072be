#!/usr/bin/env bash
# gemm12 (session 8) device call 3 (nvidia-h200 asked, came as H100): the final code (call 2's
# binaries), meant for the other card kind (the final validation may come as H200):
# 1. CPU kernel tests, the grouped GPU tests (the heuristic's new masked pick), test_moe_gpu;
# 2. the plain grouped sweep (default rows: pick = 256x128 for masked groups of >= 256 rows, the
#    old pick 128x256 forced, 128x256 with pdl the other way, 256x128, 128x128 both epilogues),
#    8 rotated rounds;
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g12; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; rcc=$?; el "test_kernels (cpu) rc=$rcc $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 120 ./test_kernels_gpu --gtest_filter='Fp8GemmGpu.Grouped*:Fp8GemmGpu.WideTilesRejectedWhereNotBuilt' > $W/test_grouped.log 2>&1; rcg=$?
grep -E "^\[ *(FAILED|PASSED|  OK) *\]|Failure" $W/test_grouped.log | head -20
el "grouped tests rc=$rcg"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; rcm=$?; el "test_moe_gpu rc=$rcm $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
B="FP8MOE_COMMIT=ede31d3+gemm12"
env $B FP8MOE_BENCH_GROUPED_ROUNDS=8 timeout 240 ./gemm_bench --only grouped --out $W/grouped.jsonl > $W/bench_grouped.log 2>&1; el "bench grouped (plain, 8 rounds) rc=$?"
python3 summary.py $W/grouped.jsonl | grep -v '128x128x128/s0/sm0 '
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm12_call3.tgz -C /tmp g12
el "done"
[ $rcc -ne 0 ] && exit $rcc
[ $rcg -ne 0 ] && exit $rcg
exit $rcm
