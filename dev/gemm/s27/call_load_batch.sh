#!/usr/bin/env bash
# Session 27: the batched producer (sm90::kModeLoadBatch2 / 4, branch s27-loadbatch, selected by
# FP8MOE_GEMM_LOAD_BATCH=2|4 for the dense 128x128 split-K (B-scale prefetch) and 128x64 unsplit
# tiles): does asking DRAM for 2 or 4 K blocks of each B row at once raise the small-M DRAM rate
# (128 x 7168 x 16384: ours 60-65 % of peak, cuBLASLt 73 %; dev/gemm/NOTES.md sessions 14-18)?
# GPU 1: the split-K / prefetch / 128x64 tests with each batch (bit for bit with the plain
# kernels). GPU 0: gemm_bench --only dense --m 128, lean, the two tiles forced, batch 0/2/4 x 2,
# alternated. Table by tile128x64_table.py per batch.
# Call: run(kind="nvidia-h100-x2", carry=["build-s27/bins3.tar.xz"],
#           command="bash dev/gemm/s27/call_load_batch.sh", timeout_s=600)
set -uo pipefail
bin=build-s27/bin3 archive=build-s27/bins3.tar.xz name=s27_c3
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
head -6 "$R/machine.txt"
filter='Fp8GemmGpuSplitK.*:Fp8GemmGpu.DenseScalePrefetch:Fp8GemmGpu128x64.*:Fp8GemmGpu.DenseDeepSeekShapesSmallM'
( for b in 2 4; do
    CUDA_VISIBLE_DEVICES=1 FP8MOE_GEMM_LOAD_BATCH=$b timeout 150 "$bin/test_kernels_gpu" \
      --gtest_filter="$filter" > "$R/test_batch$b.log" 2>&1
    echo "batch $b rc=$?" >> "$R/tests_rc.txt"
  done ) &
tiles=128x64e0w1q,128x128k2w2q
for run in 1 2; do
  for b in 0 2 4; do
    CUDA_VISIBLE_DEVICES=0 FP8MOE_GEMM_LOAD_BATCH=$b FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles \
      timeout 70 "$bin/gemm_bench" --only dense --m 128 --out "$R/b${b}_run$run.jsonl" > "$R/bench_b${b}_run$run.log" 2>&1
    el "bench batch $b run $run rc=$?"
    pack
  done
done
wait
cat "$R/tests_rc.txt"
for b in 2 4; do grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]" "$R/test_batch$b.log" | head -8; done
for b in 0 2 4; do
  echo "== batch $b"
  python3 dev/gemm/tile128x64_table.py "$R"/b${b}_run*.jsonl > "$R/table_b$b.md" 2>&1
  grep -A6 "7168 x 16384" "$R/table_b$b.md" | head -8
done
gzip -f "$R"/test_*.log
pack
el done
