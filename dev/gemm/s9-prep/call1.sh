#!/usr/bin/env bash
# Session 9, call 1 (prepared by gemm14 in session 8 without a device): 256x128 CTA pairs along N
# sharing A by TMA multicast (GemmTileConfig::pair_n; patch dev/gemm/s9-prep/pairs_n_256x128.patch)
# and B scales staged in shared memory per tile (GemmTileConfig::scale_smem), on one H100 (or
# H200: name the card with every number). Expected ~4-6 min wall.
#   1. GPU tests of the new kernels: Fp8GemmGpuPairs.* (pairs along N and B scales in shared
#      memory against the CPU reference on awkward shapes incl. odd N-block counts; at the six
#      M = 4096 V3 shapes bit-identity with the single-CTA 256x128 kernel and sampled rows against
#      the reference; the B-multicast pairs),
#      and Fp8GemmGpu.DenseWideTiles (the single-CTA 256x128 kernel, unchanged PTX).
#   2. gemm_bench dense M = 4096, the six V3 shapes, plain (graph replays at the power cap): the
#      pick, the usual forced rows, plus 256x128 single, pairs along N (a), B scales in shared
#      memory (c, GemmTileConfig::scale_smem) and both (ac), all pdl on
#      (FP8MOE_BENCH_DENSE_TILES=256x128q,256x128aq,256x128cq,256x128acq), rotated alternation.
#   3. The same with FP8MOE_BENCH_FLUSH_L2=8000 (8 GB memset before each timed launch: the GPU
#      under its cap, DeepGEMM's bench_kineto conditions).
#   4. Plain again at 4096x7168 and 7168x16384 (drift between rounds).
#   5. The whole test_kernels_gpu (the merge check; the other 20 1d2d and 2 1d1d kernels have PTX
#      identical to e98bfec).
# Setup here (not on the device): in a tree with the patch applied (git apply
# dev/gemm/s9-prep/pairs_n_256x128.patch), `bash scripts/gpu_bundle.sh` (or only
# `cmake --build build-bundle --target test_kernels_gpu gemm_bench` after its configure), then
#   mkdir -p /work/main/build-s9g && cp build-bundle/bin/test_kernels_gpu \
#     build-bundle/bin/gemm_bench dev/gemm/s9-prep/call1.sh dev/gemm/s9-prep/table.py \
#     /work/main/build-s9g/
# and run with carry ["build-s9g"], command `bash build-s9g/call1.sh`. Output: $OUT/g14_call1.tgz
# (logs, jsonl, table.md, packed again after every step); the table prints in the output too.
# Each step's timeout keeps the whole under 570 s; the full test suite gets what is left.
set -uo pipefail
H=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
W=/tmp/g14
rm -rf $W
mkdir -p $W $OUT
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a $W/steps.log; }
# The logs so far into $OUT after every step (a call stopped at the device's limit keeps them).
pack() { tar czf $OUT/g14_call1.tgz -C /tmp g14; }
# Seconds left of a 570 s budget (the device stops a command at 600 s), at least 10.
left() { local l=$((570 - ($(date +%s) - t0))); echo $((l > 10 ? l : 10)); }
# A step's timeout: at most $1 seconds, at most what is left.
tmo() { local l; l=$(left); echo $((l < $1 ? l : $1)); }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $W/gpu.txt 2>&1
cat $W/gpu.txt
cd $H
B="FP8MOE_COMMIT=${FP8MOE_COMMIT:-e98bfec+gemm14}"
T=256x128q,256x128aq,256x128cq,256x128acq
FP8MOE_GEMM_VERBOSE=1 timeout 150 ./test_kernels_gpu \
  --gtest_filter='Fp8GemmGpuPairs.*:Fp8GemmGpu.DenseWideTiles' > $W/tests_pairs.log 2>&1
el "tests Fp8GemmGpuPairs.*, DenseWideTiles rc=$?"
pack
grep -E "CTA pairs can be resident|^\[  (FAILED|PASSED) |pairN.*m=4096" $W/tests_pairs.log | head -20
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
