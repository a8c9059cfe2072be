#!/usr/bin/env bash
# gemm8 (session 6) device call 2: pdl on by default (kGemmDefaultPdl = 2) and the slab-by-slab
# TMA store for 128x256 (epilogue 3, 4 stages). CPU kernel tests; the whole test_kernels_gpu
# (every GEMM now launched with pdl; epilogue 3 in the wide-tile tests); test_moe_gpu; the plain
# gemm_bench sweep dense M = 4096, 128, 64 (pick = pdl on, "pick_pdl1" = the session-5 launch,
# rotated alternation with cuBLASLt; small M lean plus 128x256 e2/e3 with pdl off/on) and grouped
# (pick, pick without pdl, 128x256 e3, 128x128); ncu of 128x256 e2 vs e3 at contiguous 4x8192.
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
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|^\[       OK" $W/test_kernels_gpu.log | head -45
grep -E "tma_slab" $W/test_kernels_gpu.log | awk '{for(i=1;i<=NF;i++) if($i ~ /^rel_err=/) print $i}' | sort | sed -n '1p;$p'
el "test_kernels_gpu rc=$rc"
if [ $rc -ne 0 ]; then cp $W/*.log $OUT/; echo "GPU tests failed: no bench"; exit $rc; fi
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; el "test_moe_gpu rc=$? $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=128x256,128x256e3 FP8MOE_COMMIT=aa1232f+gemm8 timeout 200 ./gemm_bench --only dense --m 4096,128,64 --out $W/dense.jsonl > $W/bench_dense.log 2>&1; el "bench dense rc=$?"
FP8MOE_COMMIT=aa1232f+gemm8 timeout 120 ./gemm_bench --only grouped --out $W/grouped.jsonl > $W/bench_grouped.log 2>&1; el "bench grouped rc=$?"
python3 summary.py $W/dense.jsonl $W/grouped.jsonl
if command -v ncu >/dev/null; then
  timeout 90 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-skip 1 --launch-count 3 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
    ./gemm_bench --profile-contiguous 4 8192 4096 7168 > $W/ncu_contig_e2_e3.txt 2>&1
  el "ncu contiguous e2/e3 rc=$?"
  grep -E "^  [a-zA-Z_].*\(|Duration|SM Frequency|Pipe Tensor Cycles Active|Stall (Barrier|Long Scoreboard|Wait|Dispatch)" $W/ncu_contig_e2_e3.txt | cut -c1-130 | head -40
fi
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm8_call2.tgz -C /tmp g8
el "done"
exit $rc
