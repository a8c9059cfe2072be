#!/usr/bin/env bash
# gemm session 4, call 3: tail-split kernels as their own instantiation (kTail); test_kernels_gpu
# (all tests), the SASS of the 128x128 kernels (unsplit / split-K / tail), then gemm_bench dense at
# M = 4096 and 128 with the alternation order rotated each round (5 rounds at the tail shapes).
# The bench runs whatever the tests say (the split-K repeat test is the lead's open bug); the
# test log is in the archive. One archive under $OUT.
set -uo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-/tmp/out}; W=/tmp/g4; rm -rf $W; mkdir -p $W $OUT
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv; date -u; } > $W/env.txt 2>&1; cat $W/env.txt
cp run.sh $W/
t0=$(date +%s)
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass test_kernels_gpu 2>/dev/null | awk '/Function : /{p = /fp8_gemm_kernelILi128ELi128ELb0ELb[01]ELb[01]/} p' > $W/k128.sass
  awk '/Function : /{f=$3} /LDL|STL/{print f, $0}' $W/k128.sass | cut -c1-160 > $W/spills.txt; wc -l < $W/spills.txt
fi
timeout 170 ./test_kernels_gpu > $W/test_kernels.log 2>&1; rc=$?
grep -E "^\[ *(FAILED|PASSED) *\]|Failure|differ|tail" $W/test_kernels.log | head -30; echo "test_kernels_gpu rc=$rc ($(( $(date +%s) - t0 )) s)"
FP8MOE_COMMIT=f452fca+s4c3 timeout 240 ./gemm_bench --only dense --m 4096,128 --out $W/gemm.jsonl > $W/bench.log 2>&1; brc=$?
echo "bench rc=$brc ($(( $(date +%s) - t0 )) s)"
grep -E 'm=4096 +n=(2112|32768)|m=128 +n=(24576|32768)' $W/bench.log | grep -v 'split[0-9]' | cut -c1-60,80-200
grep -E '^dense +fp8moe ' $W/bench.log | cut -c1-200
{ nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv; date -u; } >> $W/env.txt 2>&1
tar czf $OUT/gemm4_call3.tgz -C /tmp g4
exit $rc
