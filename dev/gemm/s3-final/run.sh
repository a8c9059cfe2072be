#!/usr/bin/env bash
# gemm session 3, call 3: the default build of the worktree (FFMA interleave off; heuristic with
# the device's DRAM rate; gemm_bench recording NVML SM clock / power per row): all GPU tests of
# kernels and moe, then the full gemm_bench. Outputs in $OUT (5 files).
set -uo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $OUT/env.txt 2>&1; cat $OUT/env.txt
t0=$(date +%s)
timeout 100 ./test_kernels_gpu_base > $OUT/test_kernels.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $OUT/test_kernels.log | head; echo "test_kernels_gpu rc=$rc ($(( $(date +%s) - t0 )) s)"
timeout 60 ./test_moe_gpu > $OUT/test_moe.log 2>&1; rc2=$?
grep -E "^\[ *(FAILED|PASSED) *\]" $OUT/test_moe.log | head -3; echo "test_moe_gpu rc=$rc2 ($(( $(date +%s) - t0 )) s)"
[ $rc -eq 0 ] && [ $rc2 -eq 0 ] || exit 1
FP8MOE_COMMIT=48a30fc+s3 timeout 150 ./gemm_bench_base --out $OUT/gemm.jsonl > $OUT/bench.log 2>&1; brc=$?
echo "bench rc=$brc ($(( $(date +%s) - t0 )) s)"
grep -E '^dense +fp8moe ' $OUT/bench.log | head -20
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $OUT/env.txt 2>&1
exit $brc
