#!/usr/bin/env bash
# gemm8 (session 6) device call 1: CPU kernel tests; test_kernels_gpu (incl. the new
# Fp8GemmGpuPdl.ChainedLaunchesWaitForTheirInputs; the three long tests of unchanged kernels left
# out: their PTX changed only by the griddepcontrol pair at the prologue); test_moe_gpu; the PDL
# graph probe (does cuBLASLt's blockwise launch carry programmatic edges?); gemm_bench dense
# M=128,64 (lean: pick, pick without workspace, pick with pdl, 128x256/128x128 TMA store with and
# without pdl, cuBLASLt; rotated alternation); tiny shapes (fixed cost per launch); grouped bench
# (128x256 with and without pdl); ncu of the three M=128 losers (ours vs cuBLASLt: duration,
# DRAM, launch) and a source-level profile of the grouped contiguous 128x256 pick.
set -uo pipefail
cd "$(dirname "$0")"
unset GTEST_FILTER
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g8; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh summary.py ncu_stalls.py $W/
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
./test_kernels --gtest_brief=1 > $W/test_kernels_cpu.log 2>&1; el "test_kernels (cpu) rc=$? $(grep -E '^\[  PASSED|FAILED' $W/test_kernels_cpu.log | head -3)"
timeout 150 ./test_kernels_gpu --gtest_filter='-Fp8GemmGpu.DenseDeepSeekShapesSmallM:Fp8GemmGpuSplitK.MatchesReferenceOnDeepSeekShapes:Fp8GemmGpuSplitK.RepeatedRunsAreBitIdentical' > $W/test_kernels_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|^\[       OK" $W/test_kernels_gpu.log | head -40
grep -E "pdl after" $W/test_kernels_gpu.log | awk '{print $1, $2, $3, $(NF-2)}' | head -24
el "test_kernels_gpu rc=$rc"
if [ $rc -ne 0 ]; then cp $W/*.log $OUT/; echo "GPU tests failed: no bench"; exit $rc; fi
timeout 60 ./test_moe_gpu > $W/test_moe_gpu.log 2>&1; el "test_moe_gpu rc=$? $(grep -E '^\[  PASSED' $W/test_moe_gpu.log)"
for s in "128 32768 512" "128 7168 2048" "128 24576 1536" "4096 4096 7168"; do timeout 30 ./gemm_bench --pdl-probe $s 2>&1 | grep -E "pdl probe|rror"; done | tee $W/pdl_probe.log
el "probe done"
FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=128x256,128x128 FP8MOE_COMMIT=aa1232f+gemm8 timeout 150 ./gemm_bench --only dense --m 128,64 --out $W/dense_small.jsonl > $W/bench_dense_small.log 2>&1; el "bench dense small rc=$?"
FP8MOE_BENCH_LEAN=1 FP8MOE_COMMIT=aa1232f+gemm8 timeout 60 ./gemm_bench --only dense --m 128 --nk 128x128,256x128,1024x512 --out $W/tiny.jsonl > $W/bench_tiny.log 2>&1; el "bench tiny rc=$?"
FP8MOE_COMMIT=aa1232f+gemm8 timeout 120 ./gemm_bench --only grouped --out $W/grouped.jsonl > $W/bench_grouped.log 2>&1; el "bench grouped rc=$?"
python3 summary.py $W/dense_small.jsonl $W/tiny.jsonl $W/grouped.jsonl
if command -v ncu >/dev/null; then
  for s in "128 32768 512" "128 7168 2048" "128 24576 1536"; do
    tag=$(echo $s | tr ' ' _)
    timeout 90 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet|sm90|gemm' --section SpeedOfLight --section LaunchStats --section MemoryWorkloadAnalysis \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_active.avg,sm__cycles_elapsed.max,smsp__cycles_active.avg \
      ./gemm_bench --profile $s > $W/ncu_$tag.txt 2>&1
    el "ncu $s rc=$?"
    grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum|dram__bytes_(read|write).sum|Grid Size|Registers Per|Dynamic Shared|DRAM Throughput|sm__cycles_active.avg|Duration" $W/ncu_$tag.txt | cut -c1-150
  done
  timeout 150 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section ComputeWorkloadAnalysis --section SchedulerStats \
    --import-source no -o $W/prof_contig ./gemm_bench --profile-contiguous 4 8192 4096 7168 > $W/ncu_contig_run.log 2>&1
  el "ncu contiguous rc=$?"
  ncu -i $W/prof_contig.ncu-rep --print-details all > $W/ncu_contig_details.txt 2>&1
  grep -E "^  [a-zA-Z_].*\(|Duration|SM Frequency|Stall|Eligible|Issued Warp|Tensor|Executed Ipc|No Eligible" $W/ncu_contig_details.txt | cut -c1-150 | head -60
  ncu -i $W/prof_contig.ncu-rep --page source --print-source sass --csv > $W/src_contig.csv 2> $W/src_contig.err
  python3 ncu_stalls.py $W/src_contig.csv 40 2>&1 | head -75
  gzip -f $W/src_contig.csv
fi
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
rm -f $W/*.ncu-rep
tar czf $OUT/gemm8_call1.tgz -C /tmp g8
el "done"
exit $rc
