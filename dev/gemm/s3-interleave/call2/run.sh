#!/usr/bin/env bash
# gemm session 3, call 2: (1) the split-K GPU test that failed on the "all" build in call 1, on
# base twice, all twice, head once (is it the patch or a latent race?); (2) two rounds of
# gemm_bench --only dense --quick for all/head/none/wg1/base in turn (none: round 1 only; wg1 =
# v11 + v13's run-phase offset alone, FP8MOE_X_WGOFF=1, unpatched); (3) ncu cycles base/all/wg1.
set -uo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g3w; rm -rf $W; mkdir -p "$OUT" $W
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv > $W/env.txt 2>&1; date -u >> $W/env.txt; cat $W/env.txt
t0=$(date +%s)
for v in base all base all head; do
  timeout 60 ./test_kernels_gpu_$v --gtest_filter='*SplitK*' >> $W/splitk_$v.log 2>&1; rc=$?
  echo "splitk $v rc=$rc fails: $(grep -c 'not bit-reproducible' $W/splitk_$v.log) nonrepro, $(grep -E -c 'Failure' $W/splitk_$v.log) failures ($(( $(date +%s) - t0 )) s)"
done
bench() {  # variant round
  local bin=./gemm_bench_$1; [[ $1 == wg1 ]] && bin="env FP8MOE_X_WGOFF=1 ./gemm_bench_wgoff"
  timeout 60 $bin --only dense --quick --out $W/ab_${1}_$2.jsonl > $W/bench_${1}_$2.log 2>&1 || echo "bench $1 $2 failed"
}
for v in all head none wg1 base; do bench $v 1; done; echo "round 1 done $(( $(date +%s) - t0 )) s"
for v in all head wg1 base; do bench $v 2; done; echo "round 2 done $(( $(date +%s) - t0 )) s"
python3 ab_multi_table.py $W | tee $W/table.txt
for v in base all wg1; do
  bin=./gemm_bench_$v; [[ $v == wg1 ]] && bin="env FP8MOE_X_WGOFF=1 ./gemm_bench_wgoff"
  timeout 60 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-skip 1 --launch-count 1 --section SpeedOfLight $bin --profile 4096 4096 7168 > $W/ncu_$v.txt 2>&1
  echo "ncu $v: $(grep -E 'Elapsed Cycles' $W/ncu_$v.txt | head -1 | awk '{print $NF}') cycles, $(grep -E 'SM Frequency' $W/ncu_$v.txt | head -1 | awk '{print $(NF-1), $NF}')"
done
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv >> $W/env.txt 2>&1
tar -czf $OUT/g3.tgz -C $W . && ls -la $OUT
echo "total $(( $(date +%s) - t0 )) s"
