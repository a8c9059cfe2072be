#!/usr/bin/env bash
# gemm16 (prepared late in session 9, for session 10's first device call; H100): where the wide
# kernels' K loop waits for its stages (GemmTileConfig::stage_wait; gemm_bench tile letters t and
# r). t = kModeWaitTop: the current stage's full barrier at the top of each K block (DeepGEMM's
# placement), release after slab 1's wgmmas, no look-ahead; r = kModeReleaseFirst: the plain
# look-ahead kept, but after the stage's release. Both for the dense 256x128 (the M = 4096 pick)
# and the 128x256 kernels (the grouped contiguous pick). Binaries built here from afef196 + the
# gemm16 diff (dev/gemm/s10-prep/wait_placement.patch; static libstdc++, stripped) in
# build-gemm16/ beside this script (BUILD_INFO.txt); run with carry ["build-gemm16"], command
# `bash build-gemm16/call1.sh`. ~8 min wall (the steps stop at 570 s; G16_NCU=0 skips step 7,
# which fits only if steps 0-6 take under ~460 s; `G16_NCU_ONLY=1 bash build-gemm16/call1.sh`
# runs step 7 alone, ~2 min, as a second call).
#   0. SASS K-loop counts of the plain / t / r kernels (cuobjdump + sass_kloop.py).
#   1. Tests: Fp8GemmGpuStageWait.* (awkward shapes against the CPU reference, poisoned outputs;
#      the six M = 4096 V3 shapes and a grouped contiguous launch bit-identical to the plain
#      kernels; rejections), with the plain wide kernels' DenseWideTiles, DenseWideColumnTiles,
#      GroupedWideColumnTiles.
#   2. gemm_bench dense M = 4096 plain (graph replays at the power cap): the pick, the usual
#      forced rows, 256x128 and 128x256 with pdl named, plain / t / r, cuBLASLt, rotated.
#   3. Grouped contiguous (4 x 8192, 8 x 4096 rows; 4096x7168, 7168x2048): the pick (128x256),
#      128x256 plain / t / r with pdl named, 6 rotated rounds.
#   4. Dense as 2 with FP8MOE_BENCH_FLUSH_L2=8000 (an 8 GB memset before each timed launch).
#   5. Dense plain again at 4096x7168 and 7168x16384 (round 2).
#   6. The rest of test_kernels_gpu (everything not run in step 1).
#   7. If >= 110 s are left: ncu --set full (clock control none) of one launch each of the plain
#      256x128 and the t kernel at 4096x4096x7168: cycles and the stall samples per instruction.
# Output: $OUT/g16_call1.tgz, packed again after every step; table.md made by table.py.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g16
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
pack() { tar czf $OUT/g16_call1.tgz -C /tmp g16; }
left() { local l=$((570 - ($(date +%s) - t0))); echo $((l > 5 ? l : 5)); }
tmo() { local l; l=$(left); echo $((l < $1 ? l : $1)); }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd "$H" || exit 1
cat BUILD_INFO.txt > $W/build_info.txt 2>/dev/null
if [ "${G16_NCU_ONLY:-0}" != 1 ]; then
# 0. SASS of the K loops (mode 0 plain, 4 = t, 8 = r).
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernel
for t in "256ELi128" "128ELi256"; do
  for mode in 0 4 8; do
    f=$W/k${t%%ELi*}_m$mode
    cuobjdump -sass -fun "${K}ILi${t}ELb0ELb0ELb0ELi${mode}EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE" \
      ./test_kernels_gpu > $f.sass 2>&1
    echo "== ${t} mode $mode ($(grep -c '/\*[0-9a-f]*\*/' $f.sass) instructions)" | tee -a $W/kloops.txt
    timeout 20 python3 $H/sass_kloop.py $f.sass --dump $f.loop 2>&1 | head -8 | tee -a $W/kloops.txt
  done
done
gzip -f $W/*_m?.sass
el "sass"
pack
# 1. Tests of the placements and of the plain wide kernels.
timeout $(tmo 150) ./test_kernels_gpu \
  --gtest_filter='Fp8GemmGpuStageWait.*:Fp8GemmGpu.DenseWideTiles:Fp8GemmGpu.DenseWideColumnTiles:Fp8GemmGpu.GroupedWideColumnTiles' \
  > $W/tests_wait.log 2>&1
el "tests Fp8GemmGpuStageWait.*, DenseWideTiles, DenseWideColumnTiles, GroupedWideColumnTiles rc=$?"
grep -E "^\[  (FAILED|PASSED) |^\[  FAILED|waittop 256x128|differ" $W/tests_wait.log | head -20
pack
B="FP8MOE_COMMIT=${FP8MOE_COMMIT:-afef196+gemm16}"
T=256x128q,256x128tq,256x128rq,128x256q,128x256tq,128x256rq
# 2. Dense, plain sweep.
env $B FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 150) ./gemm_bench --only dense --m 4096 \
  --out $W/plain.jsonl > $W/plain.log 2>&1
el "bench dense plain rc=$?"
pack
# 3. Grouped contiguous.
env $B FP8MOE_BENCH_GROUPED_TILES=128x256q,128x256tq,128x256rq FP8MOE_BENCH_GROUPED_ROUNDS=6 \
  timeout $(tmo 90) ./gemm_bench --only contiguous --out $W/contiguous.jsonl > $W/contiguous.log 2>&1
el "bench contiguous rc=$?"
pack
# 4. Dense, 8 GB memset before each timed launch.
env $B FP8MOE_BENCH_FLUSH_L2=8000 FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 150) ./gemm_bench \
  --only dense --m 4096 --out $W/flush8g.jsonl > $W/flush8g.log 2>&1
el "bench dense flush8g rc=$?"
pack
# 5. Dense plain, round 2 at the two long-K shapes.
env $B FP8MOE_BENCH_DENSE_TILES=$T timeout $(tmo 60) ./gemm_bench --only dense --m 4096 \
  --nk 4096x7168,7168x16384 --out $W/plain2.jsonl > $W/plain2.log 2>&1
el "bench dense plain round 2 rc=$?"
python3 $H/table.py $W/plain.jsonl $W/flush8g.jsonl $W/plain2.jsonl $W/contiguous.jsonl \
  > $W/table.md 2>&1
cat $W/table.md
pack
# 6. The rest of test_kernels_gpu.
timeout $(tmo 200) ./test_kernels_gpu \
  --gtest_filter='-Fp8GemmGpuStageWait.*:Fp8GemmGpu.DenseWideTiles:Fp8GemmGpu.DenseWideColumnTiles:Fp8GemmGpu.GroupedWideColumnTiles' \
  > $W/tests_rest.log 2>&1
el "tests test_kernels_gpu (the rest) rc=$?"
grep -E "^\[  (FAILED|PASSED) |tests? ran" $W/tests_rest.log | head -20
pack
fi
# 7. ncu: one launch of the plain 256x128 and of t at 4096x4096x7168 (clock control none).
if [ "${G16_NCU:-1}" = 1 ] && [ "$(left)" -ge 110 ] && command -v ncu > /dev/null; then
  for r in plain:0:256x128q waittop:4:256x128tq; do
    name=${r%%:*}; rest=${r#*:}; mode=${rest%%:*}; tile=${rest#*:}
    env FP8MOE_BENCH_DENSE_TILES=$tile timeout $(tmo 50) ncu --clock-control none \
      --kernel-name-base mangled --kernel-name regex:"ILi256ELi128ELb0ELb0ELb0ELi${mode}E" \
      --launch-skip 2 --launch-count 1 --kill on --set full --import-source no \
      -o $W/${name}_prof ./gemm_bench --only dense --m 4096 --nk 4096x7168 \
      > $W/${name}_ncu_run.log 2>&1
    el "ncu $name rc=$?"
    [ -f $W/${name}_prof.ncu-rep ] || continue
    ncu -i $W/${name}_prof.ncu-rep --page details > $W/${name}_ncu_details.txt 2>&1
    ncu -i $W/${name}_prof.ncu-rep --page source --print-source sass --csv 2> /dev/null |
      gzip > $W/${name}_src.csv.gz
    python3 $H/ncu_stalls.py $W/${name}_src.csv.gz 30 > $W/${name}_stalls.txt 2>&1
    echo "== $name"
    grep -E 'Duration|Elapsed Cycles|SM Frequency|Compute \(SM\) Throughput|L2 Hit Rate' \
      $W/${name}_ncu_details.txt | head -8
    rm -f $W/${name}_prof.ncu-rep
    pack
  done
fi
el done
pack
