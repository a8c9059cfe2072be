#!/usr/bin/env bash
# gemm15, session 9, call 1 (H100): the dense 1D2D K loop unrolled over the 3 stages
# (GemmTileConfig::unroll_k, sm90::kModeUnrolledK) for 256x128 and 128x256. Binaries built here
# from 464ffc1 + the gemm15 diff (static libstdc++, stripped) in build-gemm15/ beside this script;
# run with carry ["build-gemm15"], command `bash build-gemm15/call1.sh`. ~6 min wall.
#   0. SASS of the plain and unrolled 256x128 / 128x256 kernels (cuobjdump), K loops counted by
#      sass_kloop.py (instructions per K block, opcode classes).
#   1. Tests: Fp8GemmGpuUnrolledK.* (awkward shapes against the CPU reference, poisoned outputs;
#      the six M = 4096 V3 shapes bit-identical to the plain kernels; rejections), with
#      DenseWideTiles and GroupedWideColumnTiles (the plain wide kernels).
#   2. gemm_bench dense M = 4096 plain (graph replays at the power cap): the pick, the usual
#      forced rows, 256x128 and 128x256 with pdl named, plain and unrolled, cuBLASLt, rotated
#      alternation (FP8MOE_BENCH_DENSE_TILES=256x128q,256x128uq,128x256q,128x256uq).
#   3. The same with FP8MOE_BENCH_FLUSH_L2=8000.  4. Plain again at 4096x7168, 7168x16384.
#   5. The whole test_kernels_gpu.
# Output: $OUT/g15_call1.tgz, packed again after every step.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g15
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g15_call1.tgz -C /tmp g15; }
left() { local l=$((560 - ($(date +%s) - t0))); echo $((l > 10 ? l : 10)); }
tmo() { local l; l=$(left); echo $((l < $1 ? l : $1)); }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd $H
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernel
for t in "256ELi128" "128ELi256"; do
  for mode in 0 4; do
    f=$W/k${t%%ELi*}_m$mode
    cuobjdump -sass -fun "${K}ILi${t}ELb0ELb0ELb0ELi${mode}EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE" \
      ./test_kernels_gpu > $f.sass 2>&1
    echo "== ${t} mode $mode ($(grep -c '/\*[0-9a-f]*\*/' $f.sass) instructions)" | tee -a $W/kloops.txt
    python3 $H/sass_kloop.py $f.sass --dump $f.loop 2>&1 | tee -a $W/kloops.txt
  done
done
gzip -f $W/*_m?.sass
el "sass"
pack
B="FP8MOE_COMMIT=${FP8MOE_COMMIT:-464ffc1+gemm15}"
T=256x128q,256x128uq,128x256q,128x256uq
FP8MOE_GEMM_VERBOSE=1 timeout 150 ./test_kernels_gpu \
  --gtest_filter='Fp8GemmGpuUnrolledK.*:Fp8GemmGpu.DenseWideTiles:Fp8GemmGpu.GroupedWideColumnTiles' \
  > $W/tests_unrolled.log 2>&1
el "tests Fp8GemmGpuUnrolledK.*, DenseWideTiles, GroupedWideColumnTiles rc=$?"
pack
grep -E "^\[  (FAILED|PASSED) |^\[  FAILED|unrolled 256x128.*m=4096|differ" $W/tests_unrolled.log | head -20
env $B FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 170) ./gemm_bench --only dense --m 4096 \
  --out $W/plain.jsonl > $W/plain.log 2>&1
el "bench plain rc=$?"
pack
env $B FP8MOE_BENCH_FLUSH_L2=8000 FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 150) ./gemm_bench \
  --only dense --m 4096 --out $W/flush8g.jsonl > $W/flush8g.log 2>&1
el "bench flush8g rc=$?"
pack
env $B FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 60) ./gemm_bench --only dense --m 4096 \
  --nk 4096x7168,7168x16384 --out $W/plain2.jsonl > $W/plain2.log 2>&1
el "bench plain round 2 rc=$?"
python3 $H/table.py $W/plain.jsonl $W/flush8g.jsonl $W/plain2.jsonl > $W/table.md 2>&1
cat $W/table.md
pack
timeout $(left) ./test_kernels_gpu > $W/tests_all.log 2>&1
el "tests test_kernels_gpu (all) rc=$?"
grep -E "^\[  (FAILED|PASSED) |tests? ran" $W/tests_all.log | head -20
el done
pack
