#!/usr/bin/env bash
# gemm13 (session 8) device call 1 (H100): DeepGEMM 2.6.1 (54e2261, cutlass f3fde58, fmt 553ec11;
# sources in the git-ignored build-gemm13/deepgemm, nothing of it in the repo) built on the device,
# its fp8_gemm_nt (1D2D, BF16 out) timed its own way and ours at the six M = 4096 V3 shapes, our
# gemm_bench (plain graph replays, 8 GB-memset flush, 256 MB-memset flush) on the same shapes, an
# NVML sampler (SM clock, power, clock-event reasons every ~2 ms) over everything, and the SASS of
# DeepGEMM's JIT-compiled kernels. Run as build-gemm13/run.sh (a copy), files beside it.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}; W=/tmp/g13; rm -rf $W; mkdir -p $W $W/sass $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
now() { date +%s.%N; }
ph() { echo "{\"phase\": \"$1\", \"t0\": $2, \"t1\": $3}" >> $W/phases.jsonl; }
{ nvidia-smi; nvidia-smi -q -d CLOCK,POWER,PERFORMANCE; date -u; } > $W/env.txt 2>&1
python3 $H/nvml_sampler.py $W/nvml.csv $W/stop & SP=$!
ti=$(now); sleep 2; ph idle $ti $(now)

# 1. DeepGEMM build (its JIT needs cute/cutlass under deep_gemm/include, as its develop.sh links)
cd $H/deepgemm
ln -sfn ../../third-party/cutlass/include/cutlass deep_gemm/include/cutlass
ln -sfn ../../third-party/cutlass/include/cute deep_gemm/include/cute
tb=$(now)
timeout 420 python3 setup.py build_ext --inplace > $W/dg_build.log 2>&1; rcb=$?
el "deepgemm build rc=$rcb, $(python3 -c "print(round($(now)-$tb,1))") s"; tail -3 $W/dg_build.log
cd $H
export DG_JIT_CACHE_DIR=$W/dgcache PYTHONPATH=$H/deepgemm DG_PRINT_CONFIGS=1 PYTHONUNBUFFERED=1
LIBSTD=$(ldconfig -p | grep 'libstdc++.so.6 ' | grep -m1 x86-64 | awk '{print $NF}')
echo "LD_PRELOAD for python: $LIBSTD"
if [ $rcb -eq 0 ]; then
  # 2. JIT-compile the six kernels in parallel (one process per shape), then time them.
  tj=$(now); pids=()
  for s in 4096x4096x7168 4096x2112x7168 4096x24576x1536 4096x32768x512 4096x7168x16384 4096x7168x2048; do
    env LD_PRELOAD=$LIBSTD timeout 300 python3 $H/dg_bench.py --jit ${s//x/ } > $W/jit_$s.log 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait $p || echo "jit pid $p rc=$?"; done
  el "deepgemm jit $(python3 -c "print(round($(now)-$tj,1))") s"; grep -h -i -m3 "error\|config" $W/jit_*.log | head -20
  env LD_PRELOAD=$LIBSTD timeout 240 python3 $H/dg_bench.py "" $W/dg_rows.jsonl > $W/dg_bench.log 2>&1; el "dg_bench rc=$?"
  grep -v '^ *>' $W/dg_bench.log | grep -v '"phase"' | head -40
fi

# 3. Ours, same shapes: plain (graph replays), 8 GB flush (DeepGEMM's bench_kineto memset), 256 MB.
B="FP8MOE_COMMIT=f05424a+gemm13"
NK=4096x7168,2112x7168,24576x1536,32768x512,7168x16384,7168x2048
ta=$(now); env $B timeout 200 ./gemm_bench --only dense --m 4096 --nk $NK --out $W/ours_plain.jsonl > $W/ours_plain.log 2>&1; el "ours plain rc=$?"; ph ours_plain $ta $(now)
ta=$(now); env $B FP8MOE_BENCH_FLUSH_L2=8000 timeout 200 ./gemm_bench --only dense --m 4096 --nk $NK --out $W/ours_flush8g.jsonl > $W/ours_flush8g.log 2>&1; el "ours flush8g rc=$?"; ph ours_flush8g $ta $(now)
ta=$(now); env $B FP8MOE_BENCH_FLUSH_L2=1 timeout 60 ./gemm_bench --only dense --m 4096 --nk 4096x7168 --out $W/ours_flush256.jsonl > $W/ours_flush256.log 2>&1; el "ours flush256 rc=$?"; ph ours_flush256 $ta $(now)
# DeepGEMM back-to-back once more at the end (drift check), first shape only.
[ $rcb -eq 0 ] && { env LD_PRELOAD=$LIBSTD timeout 60 python3 $H/dg_bench.py 4096x4096x7168 $W/dg_rows_again.jsonl > $W/dg_bench_again.log 2>&1; el "dg again rc=$?"; }
touch $W/stop; wait $SP

# 4. SASS of DeepGEMM's kernels, the JIT sources (their template arguments are the config)
find $W/dgcache -name '*.cubin' | while read f; do d=$(basename $(dirname $f)); cuobjdump -sass $f > $W/sass/$d.sass 2>&1; cp $(dirname $f)/*.cu $W/sass/$d.cu 2>/dev/null; done
ls -la $W/sass | head -20
cat $W/dg_rows.jsonl $W/dg_rows_again.jsonl $W/phases.jsonl 2>/dev/null > $W/all_phases.jsonl
python3 $H/phase_summary.py $W/nvml.csv $W/all_phases.jsonl | tee $W/phase_summary.txt
grep -h -E "^dense +(fp8moe|cublaslt_fp8_blockwise|fp8moe_forced)" $W/ours_*.log | cut -c1-60,100-118,175-400
tar czf $OUT/g13_call1.tgz -C /tmp g13
el done
