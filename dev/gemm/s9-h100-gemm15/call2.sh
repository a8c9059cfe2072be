#!/usr/bin/env bash
# gemm15, session 9, call 2 (H100): the unrolled K loop with opaque bases (opaque_if: descriptors,
# barriers and the A-scale row as values cicc cannot fold the stage offsets back into; lds_f32).
# Short (the helper's last ~100 counted seconds): SASS K-loop counts, Fp8GemmGpuUnrolledK.*
# (the fixed rejection tests included), gemm_bench dense M = 4096 plain at four shapes and again
# at two. Binaries of 464ffc1 + the gemm15 diff in build-gemm15/; `bash build-gemm15/call2.sh`.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g15c2
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g15_call2.tgz -C /tmp g15c2; }
left() { local l=$((135 - ($(date +%s) - t0))); echo $((l > 5 ? l : 5)); }
tmo() { local l; l=$(left); echo $((l < $1 ? l : $1)); }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd $H
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernel
for t in "256ELi128" "128ELi256"; do
  f=$W/k${t%%ELi*}_m4
  cuobjdump -sass -fun "${K}ILi${t}ELb0ELb0ELb0ELi4EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE" \
    ./test_kernels_gpu > $f.sass 2>&1
  echo "== ${t} mode 4 ($(grep -c '/\*[0-9a-f]*\*/' $f.sass) instructions)" | tee -a $W/kloops.txt
  python3 $H/sass_kloop.py $f.sass --dump $f.loop 2>&1 | head -4 | tee -a $W/kloops.txt
done
gzip -f $W/*_m4.sass
el "sass"
pack
timeout $(tmo 45) ./test_kernels_gpu --gtest_filter='Fp8GemmGpuUnrolledK.*' > $W/tests_unrolled.log 2>&1
el "tests Fp8GemmGpuUnrolledK.* rc=$?"
grep -E "^\[  (FAILED|PASSED) |Failure" $W/tests_unrolled.log | head -10
pack
B="FP8MOE_COMMIT=${FP8MOE_COMMIT:-464ffc1+gemm15b}"
T=256x128q,256x128uq,128x256q,128x256uq
env $B FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 60) ./gemm_bench --only dense --m 4096 \
  --nk 4096x7168,7168x16384,24576x1536,7168x2048 --out $W/plain.jsonl > $W/plain.log 2>&1
el "bench plain rc=$?"
pack
env $B FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 40) ./gemm_bench --only dense --m 4096 \
  --nk 4096x7168,7168x16384 --out $W/plain2.jsonl > $W/plain2.log 2>&1
el "bench plain round 2 rc=$?"
python3 $H/table.py $W/plain.jsonl $W/plain2.jsonl > $W/table.md 2>&1
cat $W/table.md
el done
pack
