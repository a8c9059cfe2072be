#!/usr/bin/env bash
# gemm8 (session 6) device call 3 (nvidia-h200; item 3: the session-5/6 defaults re-measured on
# H200): the final code (pdl on by default; PTX of every kernel = aa1232f's plus the
# griddepcontrol pair). CPU kernel tests; the whole test_kernels_gpu; test_moe_gpu; the plain
# gemm_bench sweep dense M = 4096, 128, 64 (pick = pdl on, "pick_pdl1" = the session-5 launch,
# rotated alternation with cuBLASLt; small M lean) and grouped (pick, 128x256 pdl on / off,
# 128x128 TMA store / registers).
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g8; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; el "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 240 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_gpu.log | head -20
el "test_kernels_gpu rc=$rc"
if [ $rc -ne 0 ]; then cp $W/*.log $OUT/; echo "GPU tests failed: no bench"; exit $rc; fi
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; el "test_moe_gpu rc=$? $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
FP8MOE_BENCH_LEAN=1 FP8MOE_COMMIT=aa1232f+gemm8 timeout 200 ./gemm_bench --only dense --m 4096,128,64 --out $W/dense.jsonl > $W/bench_dense.log 2>&1; el "bench dense rc=$?"
FP8MOE_COMMIT=aa1232f+gemm8 timeout 120 ./gemm_bench --only grouped --out $W/grouped.jsonl > $W/bench_grouped.log 2>&1; el "bench grouped rc=$?"
python3 summary.py $W/dense.jsonl $W/grouped.jsonl | grep -v "tail\|pair"
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm8_call3.tgz -C /tmp g8
el "done"
exit $rc
