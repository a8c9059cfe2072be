#!/usr/bin/env bash
# Session 4 split-K diagnosis, call 2: which block counts per unit trigger the differing runs,
# with and without split, base vs split-K without the overlapped promotion; plus the SASS of the
# 128x128 split kernel.
set -u
cd "$(dirname "$0")/.."
export FP8MOE_REPEAT_RUNS=${REPS:-300}
export FP8MOE_REPEAT_CASES="1,24576,1536,128,128,8;1,24576,1536,128,128,6;1,24576,2048,128,128,8;1,24576,1280,128,128,8;1,24576,2560,128,128,8;128,24576,1536,128,128,8;128,24576,2048,128,128,8;1024,8192,256,128,128,1;1024,8192,384,128,128,1;4096,4096,256,128,128,1;1,24576,1536,64,128,8;1,24576,1536,64,64,8"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
for round in 1 2; do
  for v in base nooverlap; do
    echo "== round $round $v"
    timeout 150 build-gemmdiag/test_kernels_gpu_$v --gtest_filter='*RepeatedRuns*' > $OUT/${v}_$round.log 2>&1
    echo "rc=$?"
    grep -E "runs differ" $OUT/${v}_$round.log | sort | uniq
  done
done
if command -v cuobjdump > /dev/null; then
  cuobjdump -sass build-gemmdiag/test_kernels_gpu_base > /tmp/all.sass 2>&1
  awk '/Function : .*fp8_gemm_kernelILi128ELi128ELb0ELb1E/{p=1} p&&/Function : /&&!/ILi128ELi128ELb0ELb1E/{p=0} p' /tmp/all.sass > $OUT/split128.sass
  wc -l $OUT/split128.sass
  gzip $OUT/split128.sass
fi
