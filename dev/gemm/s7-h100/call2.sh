#!/usr/bin/env bash
# gemm10 (session 7) device call 2 (nvidia-h200 asked; H100 or H200, whichever comes): CPU kernel tests; new GPU tests (DenseScaleVariants,
# pairs along N, PDL chains); gemm_bench M=128 and M=64 (lean, rotated alternation) with forced
# rows: v4 = B scale loaded one K block ahead (the first before the tile's first wait), v12 = and
# the B scales prefetched into L2 at the start, a = CTA pairs along N (A multicast), k2 = split 2;
# three more repeats of 128x32768x512 and 128x7168x16384; ncu of 128x32768x512 and
# 128x7168x16384 (pick, v12, cuBLASLt) and a source-level stall profile of 128x128 v12.
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
timeout 120 ./test_kernels_gpu --gtest_filter='Fp8GemmGpu.DenseScaleVariants:Fp8GemmGpuPairs.*:Fp8GemmGpuPdl.*' > $W/test_new_gpu.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|^\[       OK" $W/test_new_gpu.log | head -20
awk '/rel_err/ {split($0,a,"rel_err="); split(a[2],b," "); if (b[1]+0 > mx) mx=b[1]+0; n++} END {print n, "checks, max rel_err", mx}' $W/test_new_gpu.log
el "new GPU tests rc=$rc"
if [ $rc -ne 0 ]; then cp $W/*.log $OUT/; echo "new GPU tests failed: stop"; exit $rc; fi
B="FP8MOE_COMMIT=921936a+gemm10 FP8MOE_BENCH_LEAN=1 FP8MOE_GEMM_VERBOSE=1"
env $B FP8MOE_BENCH_SMALL_TILES=128x128q,128x128v4q,128x128v12q,128x128av12q,128x128ak2q,64x128v12q,64x64v12q timeout 200 ./gemm_bench --only dense --m 128 --out $W/m128.jsonl > $W/bench_m128.log 2>&1; el "bench m128 rc=$?"
python3 summary.py $W/m128.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
for rep in 1 2 3; do
  env $B FP8MOE_BENCH_SMALL_TILES=128x128q,128x128v4q,128x128v12q,128x128av12q,128x128ak2q timeout 80 ./gemm_bench --only dense --m 128 --nk 32768x512,7168x16384 --out $W/rep$rep.jsonl > $W/bench_rep$rep.log 2>&1
done; el "repeats done"
python3 summary.py $W/rep*.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
env $B FP8MOE_BENCH_SMALL_TILES=64x128v12q,64x64v12q timeout 120 ./gemm_bench --only dense --m 64 --out $W/m64.jsonl > $W/bench_m64.log 2>&1; el "bench m64 rc=$?"
python3 summary.py $W/m64.jsonl | grep -v "pdl1\|fp8moe_nosplit\|bf16\|tensor"
if command -v ncu >/dev/null; then
  for s in "128 32768 512" "128 7168 16384"; do
    tag=$(echo $s | tr ' ' _)
    FP8MOE_BENCH_PROFILE_TILES=128x128v12q,64x128v12q,128x128ak2q,128x128k2q timeout 100 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' --section SpeedOfLight --section LaunchStats \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_elapsed.max,lts__t_sectors_srcunit_tex_op_read.sum \
      ./gemm_bench --profile $s > $W/ncu_$tag.txt 2>&1
    el "ncu $s rc=$?"
    grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum|Grid Size|Cluster Size|sm__cycles_active|sm__cycles_elapsed" $W/ncu_$tag.txt | cut -c1-110
  done
  FP8MOE_BENCH_PROFILE_TILES=128x128v12q timeout 100 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters \
    --import-source no -o $W/prof_v12 ./gemm_bench --profile 128 32768 512 > $W/ncu_prof_run.log 2>&1
  el "ncu source rc=$?"
  ncu -i $W/prof_v12.ncu-rep --page source --print-source sass --csv > $W/src_v12.csv 2> $W/src_v12.err
  python3 ncu_stalls.py $W/src_v12.csv 16 2>&1 | head -36
  gzip -f $W/src_v12.csv
fi
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
rm -f $W/*.ncu-rep
tar czf $OUT/gemm10_call2.tgz -C /tmp g10
el "done"
exit $rc
