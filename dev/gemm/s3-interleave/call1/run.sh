#!/usr/bin/env bash
# gemm session 3, call 1: FFMA-interleave A/B (binaries built from /work/gemm-s3-wt, unpatched
# "base" and copies patched by tools/sass_interleave.cpp --mode all|head|none).
# 1 SASS diff base vs each mode (only FFMA yield/reuse bits, only after wgmma waits);
# 2 GPU tests on the "all" build (test_moe_gpu has no GEMM kernel: base);
# 3 two rounds of gemm_bench --only dense --quick, every variant in turn; one round at M = 64;
# 4 ncu cycles of each at 4096x4096x7168. Logs + jsonl in $OUT/g3.tgz, tables on stdout.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/out}; W=/tmp/g3w; rm -rf $W; mkdir -p "$OUT" $W
V="all head none base"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; which cuobjdump ncu; } > $W/env.txt 2>&1
cat $W/env.txt
t0=$(date +%s)
cuobjdump -sass gemm_bench_base > $W/base.sass 2>&1
for m in all head none; do
  cuobjdump -sass gemm_bench_$m > $W/$m.sass 2>&1
  python3 sass_diff.py $W/base.sass $W/$m.sass > $W/diff_$m.txt; echo "sass diff $m rc=$?"; tail -1 $W/diff_$m.txt
done
grep -E '128ELi128ELb0ELb0|64ELi128ELb0ELb0' $W/diff_all.txt | head -4
cuobjdump -sass test_kernels_gpu_base > $W/tbase.sass 2>&1; cuobjdump -sass test_kernels_gpu_all > $W/tall.sass 2>&1
python3 sass_diff.py $W/tbase.sass $W/tall.sass > $W/diff_test_all.txt; echo "sass diff test binary rc=$?"; tail -1 $W/diff_test_all.txt
echo "sass checks $(( $(date +%s) - t0 )) s"
timeout 120 ./test_kernels_gpu_all > $W/test_kernels_all.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure" $W/test_kernels_all.log | head; echo "test_kernels_gpu (all) rc=$rc"
timeout 60 ./test_moe_gpu > $W/test_moe.log 2>&1; rc2=$?
grep -E "^\[ *(FAILED|PASSED) *\]" $W/test_moe.log | head -3; echo "test_moe_gpu rc=$rc2 ($(( $(date +%s) - t0 )) s)"
if [ $rc -ne 0 ]; then tar -czf $OUT/g3.tgz -C $W .; exit 1; fi
for r in 1 2; do for v in $V; do
  timeout 60 ./gemm_bench_$v --only dense --quick --out $W/ab_${v}_$r.jsonl > $W/bench_${v}_$r.log 2>&1 || echo "bench $v $r failed"
done; echo "round $r done $(( $(date +%s) - t0 )) s"; done
for v in $V; do timeout 60 ./gemm_bench_$v --only dense --m 64 --out $W/small_${v}.jsonl > $W/small_${v}.log 2>&1 || echo "small $v failed"; done
echo "small done $(( $(date +%s) - t0 )) s"
python3 ab_multi_table.py $W | tee $W/table.txt
for v in $V; do
  timeout 60 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-skip 1 --launch-count 1 --section SpeedOfLight ./gemm_bench_$v --profile 4096 4096 7168 > $W/ncu_$v.txt 2>&1
  echo "ncu $v: $(grep -E 'Elapsed Cycles' $W/ncu_$v.txt | head -1 | awk '{print $NF}') cycles, $(grep -E 'SM Frequency' $W/ncu_$v.txt | head -1 | awk '{print $(NF-1), $NF}')"
done
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv >> $W/env.txt 2>&1
rm -f $W/*.sass.gz; gzip $W/*.sass
tar -czf $OUT/g3.tgz -C $W . && ls -la $OUT
echo "total $(( $(date +%s) - t0 )) s"
