#!/usr/bin/env bash
# gemm10 (session 7) device call 1 (H100): CPU kernel tests; the whole test_kernels_gpu (new:
# Fp8GemmGpuPairs.DenseCtaPairsAlongN, pairs along N / exit-read in the PDL chain test);
# test_moe_gpu; gemm_bench M=128 (lean, rotated alternation) with forced rows: a = CTA pairs along N
# sharing A (multicast), r = exit after the last TMA stores' shared-memory reads, sN stages,
# k2 = split-K 2; three more repeats of 128x32768x512; M=64 with 64x128 exit-read; ncu of
# 128x32768x512 (pick, pairs along N, exit-read, cuBLASLt: duration, active cycles, DRAM and
# L2->SM bytes) and a source-level stall profile of the pick.
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g10; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py ncu_stalls.py $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; el "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 100 ./test_kernels_gpu --gtest_filter='Fp8GemmGpuPairs.*:Fp8GemmGpuPdl.*' > $W/test_new_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|^\[       OK" $W/test_new_gpu.log | head -20
grep -E "pairN|exitR" $W/test_new_gpu.log | awk '{print $1, $2, $3, $4, $5, $6}' | sort | uniq -c | sort -rn | head -12
el "new GPU tests rc=$rc"
if [ $rc -ne 0 ]; then cp $W/*.log $OUT/; echo "new GPU tests failed: stop"; exit $rc; fi
B="FP8MOE_COMMIT=921936a+gemm10 FP8MOE_BENCH_LEAN=1 FP8MOE_GEMM_VERBOSE=1"
env $B FP8MOE_BENCH_SMALL_TILES=128x128aq,128x128rq,128x128arq,128x128s4q,128x128s3q,128x128ak2q,128x192aq timeout 200 ./gemm_bench --only dense --m 128 --out $W/m128.jsonl > $W/bench_m128.log 2>&1; el "bench m128 rc=$?"; grep -h "CTA pairs can be resident" $W/bench_m128.log | sort | uniq
python3 summary.py $W/m128.jsonl | grep -v "pdl1\|fp8moe_nosplit"
for rep in 1 2 3; do
  env $B FP8MOE_BENCH_SMALL_TILES=128x128aq,128x128rq,128x128arq timeout 60 ./gemm_bench --only dense --m 128 --nk 32768x512 --out $W/rep$rep.jsonl > $W/bench_rep$rep.log 2>&1
done; el "repeats done"
python3 summary.py $W/rep*.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
env $B FP8MOE_BENCH_SMALL_TILES=64x128rq timeout 120 ./gemm_bench --only dense --m 64 --out $W/m64.jsonl > $W/bench_m64.log 2>&1; el "bench m64 rc=$?"
python3 summary.py $W/m64.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
timeout 200 ./test_kernels_gpu > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_gpu.log | head -20
el "test_kernels_gpu (all) rc=$rc"
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; el "test_moe_gpu rc=$? $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
if command -v ncu >/dev/null; then
  FP8MOE_BENCH_PROFILE_TILES=128x128aq,128x128rq timeout 100 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' --section SpeedOfLight --section LaunchStats \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min,sm__cycles_elapsed.max,lts__t_sectors_srcunit_tex_op_read.sum,smsp__cycles_active.avg \
    ./gemm_bench --profile 128 32768 512 > $W/ncu_128_32768_512.txt 2>&1
  el "ncu rc=$?"
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum|dram__bytes_read.sum|lts__t_sectors_srcunit|Grid Size|Cluster Size|Dynamic Shared|sm__cycles_active|sm__cycles_elapsed" $W/ncu_128_32768_512.txt | cut -c1-120
  timeout 100 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters \
    --import-source no -o $W/prof_pick ./gemm_bench --profile 128 32768 512 > $W/ncu_prof_run.log 2>&1
  el "ncu source rc=$?"
  ncu -i $W/prof_pick.ncu-rep --page source --print-source sass --csv > $W/src_pick.csv 2> $W/src_pick.err
  python3 ncu_stalls.py $W/src_pick.csv 30 2>&1 | head -60
  gzip -f $W/src_pick.csv
fi
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
rm -f $W/*.ncu-rep
tar czf $OUT/gemm10_call1.tgz -C /tmp g10
el "done"
exit $rc
