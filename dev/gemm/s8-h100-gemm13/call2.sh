#!/usr/bin/env bash
# gemm13 (session 8) device call 2 (H100): call 1's DeepGEMM timing crashed on a script bug
# (json of a tensor) after the build; this call: DeepGEMM rebuilt (JIT cache of call 1 carried),
# dg_bench.py at the six M = 4096 shapes (bench_kineto 8 GB flush, back-to-back graph replays,
# 8 GB-flush events, bench_kineto without flush), ours in the same call (plain sweep; 8 GB flush
# at two shapes), an NVML sampler throughout; ncu --set full (clock control none) of one launch
# each of DeepGEMM's and our 256x128 kernel at 4096x4096x7168 (cycles, in-kernel SM clock,
# per-SASS stalls), and our kernel's SASS. Run as build-gemm13/run.sh (a copy), files beside it
# (carried one by one, DeepGEMM's sources as build-gemm13/dgsrc).
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}; W=/tmp/g13; rm -rf $W; mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a $W/steps.log; }
now() { date +%s.%N; }
ph() { echo "{\"phase\": \"$1\", \"t0\": $2, \"t1\": $3}" >> $W/phases.jsonl; }
{ nvidia-smi; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE; date -u; } > $W/env.txt 2>&1
python3 $H/nvml_sampler.py $W/nvml.csv $W/stop & SP=$!
KO=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi256ELi128ELb0ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
cuobjdump -sass -fun "$KO" $H/gemm_bench > $W/ours_256x128.sass 2>&1; el "our sass $(wc -l < $W/ours_256x128.sass) lines"

# DeepGEMM: the folder built by call 1 stays on a machine that was kept warm since (not carried:
# carried paths replace theirs); otherwise a fresh copy of the sources (dgsrc) is built.
if ls $H/deepgemm/deep_gemm/_C*.so > /dev/null 2>&1; then
  el "deepgemm: call 1's build found"; DGB=0
else
  rm -rf $H/deepgemm; cp -r $H/dgsrc $H/deepgemm; DGB=1
fi
cd $H/deepgemm
ln -sfn ../../third-party/cutlass/include/cutlass deep_gemm/include/cutlass
ln -sfn ../../third-party/cutlass/include/cute deep_gemm/include/cute
rcb=0; [ $DGB -eq 1 ] && { timeout 300 python3 setup.py build_ext --inplace > $W/dg_build.log 2>&1; rcb=$?; el "deepgemm build rc=$rcb"; }
cd $H
cp -r $H/dgcache $W/dgcache
export DG_JIT_CACHE_DIR=$W/dgcache PYTHONPATH=$H/deepgemm DG_PRINT_CONFIGS=1 PYTHONUNBUFFERED=1
LIBSTD=$(ldconfig -p | grep 'libstdc++.so.6 ' | grep -m1 x86-64 | awk '{print $NF}')
B="FP8MOE_COMMIT=f05424a+gemm13"
if [ $rcb -eq 0 ]; then
  env LD_PRELOAD=$LIBSTD timeout 200 python3 $H/dg_bench.py "" $W/dg_rows.jsonl > $W/dg_bench.log 2>&1; el "dg_bench rc=$?"
  grep -E '^\{"(shape|phase)' $W/dg_bench.log | cut -c1-260
fi
ta=$(now); env $B timeout 120 ./gemm_bench --only dense --m 4096 --nk 4096x7168,2112x7168,24576x1536,32768x512,7168x16384,7168x2048 --out $W/ours_plain.jsonl > $W/ours_plain.log 2>&1; el "ours plain rc=$?"; ph ours_plain $ta $(now)
ta=$(now); env $B FP8MOE_BENCH_FLUSH_L2=8000 timeout 60 ./gemm_bench --only dense --m 4096 --nk 4096x7168,7168x16384 --out $W/ours_flush8g.jsonl > $W/ours_flush8g.log 2>&1; el "ours flush8g rc=$?"; ph ours_flush8g $ta $(now)
touch $W/stop; wait $SP
# ncu, one launch each, 4096x4096x7168
if [ $rcb -eq 0 ]; then
  env LD_PRELOAD=$LIBSTD timeout 120 ncu --clock-control none --kernel-name regex:sm90_fp8_gemm_1d2d --launch-skip 2 --launch-count 1 --kill on --set full --import-source no -o $W/dg_prof python3 $H/dg_bench.py --ncu 4096 4096 7168 > $W/dg_ncu_run.log 2>&1; el "ncu dg rc=$?"
fi
timeout 120 ncu --clock-control none --kernel-name-base mangled --kernel-name regex:'ILi256ELi128ELb0ELb0ELb0ELi0E' --launch-skip 2 --launch-count 1 --kill on --set full --import-source no -o $W/ours_prof ./gemm_bench --only dense --m 4096 --nk 4096x7168 > $W/ours_ncu_run.log 2>&1; el "ncu ours rc=$?"
for r in dg ours; do
  [ -f $W/${r}_prof.ncu-rep ] || continue
  ncu -i $W/${r}_prof.ncu-rep --page details > $W/${r}_ncu_details.txt 2>&1
  ncu -i $W/${r}_prof.ncu-rep --page source --print-source sass --csv 2> $W/${r}_src.err | gzip > $W/${r}_src.csv.gz
  python3 $H/ncu_stalls.py $W/${r}_src.csv.gz 30 > $W/${r}_stalls.txt 2>&1
  echo "== $r"; grep -E 'Duration|Elapsed Cycles|SM Frequency|DRAM Frequency|Registers Per|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|L2 Hit Rate' $W/${r}_ncu_details.txt | head -14
  rm -f $W/${r}_prof.ncu-rep
done
cat $W/dg_rows.jsonl $W/phases.jsonl 2>/dev/null > $W/all_phases.jsonl
python3 $H/phase_summary.py $W/nvml.csv $W/all_phases.jsonl | tee $W/phase_summary.txt
grep -h -E "^dense +(fp8moe |cublaslt_fp8_blockwise)" $W/ours_*.log | cut -c1-120
rm -rf $W/dgcache
tar czf $OUT/g13_call2.tgz -C /tmp g13
el done
