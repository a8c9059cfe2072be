#!/usr/bin/env bash
# Session 12, gemm21 call 2: p1 (next tile's loads a tile ahead) against the landed gathered producer
# on the other card kind (H200), the binaries of call 1. One GPU.
# Call: run(kind="nvidia-h200", carry=["build-gemm21"], command="bash build-gemm21/run2.sh")
#   1. Producer1EqualsContiguous and the other gathered tests;
#   2. gemm_bench --only gathered twice, 9 rounds: contiguous, landed gathered, p1 rotated.
# One archive back: $OUT/gemm21_call2.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM21_BIN:-build-gemm21} archive=build-gemm21/bins.tar.xz name=gemm21_call2
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp "$bin/BUILD_INFO.txt" "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
timeout 90 "$bin/test_kernels_gpu" --gtest_filter="Fp8GemmGatheredGpu.Producer1EqualsContiguous" \
  > "$R/test_p1.log" 2>&1
rc=$?
el "1. Producer1EqualsContiguous rc=$rc"; grep -E "^\[  (PASSED|FAILED)" "$R/test_p1.log"
producers=""
[[ $rc == 0 ]] && producers=1
timeout 150 "$bin/test_kernels_gpu" \
  --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*:-Fp8GemmGatheredGpu.Producer*' \
  > "$R/tests.log" 2>&1
el "1. gathered tests rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/tests.log"
pack
for run in 1 2; do
  FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=9 timeout 170 \
    "$bin/gemm_bench" --only gathered --out "$R/gathered_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 dev/gemm/variants_table.py "$R"/gathered_run1.jsonl "$R"/gathered_run2.jsonl > "$R/table.md" 2>&1
cat "$R/table.md"
el "done"
pack
