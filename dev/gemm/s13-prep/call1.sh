#!/usr/bin/env bash
# Session 13, call 1 (prepared by gemm23 in late session 12): two A/B producers of the gathered grouped
# GEMM (GemmTileConfig::gather_producer 1 = the A scales' TMA issued by warp 1's lane 0, B's alone by
# thread 0, each posting its own bytes; 2 = the landed producer and B prefetched into L2 a ring of
# stages ahead by warp 3's lane 0 after its arrival), against the landed producer and the contiguous
# GEMM; one GPU.
# dev/gemm/NOTES.md "Session 12 late — the gathered producer's TMA issue, prepared (gemm23)".
# Binaries: /work/main/build-gemm23/ (stripped, BUILD_INFO.txt; this script is build-gemm23/run.sh).
# Call: run(kind="nvidia-h100-x1", carry=["build-gemm23"], command="bash build-gemm23/run.sh")
#   1. test_kernels_gpu: Producer{1,2}EqualsContiguous each alone under a timeout (a variant that
#      fails or hangs is not timed), then the other gathered tests;
#   2. gemm_bench --only gathered, twice, 7 rounds, rotated in one process at the four grouped
#      picks on the EP's record stride: contiguous, landed gathered, the passing variants;
#   3. forced 128x256e1 (4 stages: the depth-2 loop), 5 rounds (if time is left).
# One archive back: $OUT/gemm23_call1.tgz (table.md made by dev/gemm/variants_table.py).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM23_BIN:-build-gemm23} archive=build-gemm23/bins.tar.xz name=gemm23_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp "$bin/BUILD_INFO.txt" "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
producers=""
for v in 1 2; do
  timeout 90 "$bin/test_kernels_gpu" --gtest_filter="Fp8GemmGatheredGpu.Producer${v}EqualsContiguous" \
    > "$R/test_p$v.log" 2>&1
  rc=$?
  el "1. Producer${v}EqualsContiguous rc=$rc"; grep -E "^\[  (PASSED|FAILED)" "$R/test_p$v.log"
  [[ $rc == 0 ]] && producers+=$v
done
timeout 150 "$bin/test_kernels_gpu" \
  --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*:-Fp8GemmGatheredGpu.Producer*' \
  > "$R/tests.log" 2>&1
el "1. gathered tests rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/tests.log"
pack
for run in 1 2; do
  FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 170 \
    "$bin/gemm_bench" --only gathered --out "$R/gathered_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
files=("$R"/gathered_run1.jsonl "$R"/gathered_run2.jsonl)
if (( $(date +%s) - t0 < 300 )); then
  FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=5 \
    FP8MOE_BENCH_GATHERED_TILES=128x256e1q timeout 150 "$bin/gemm_bench" --only gathered \
    --out "$R/gathered_forced.jsonl" > "$R/bench_forced.log" 2>&1
  el "3. bench forced 128x256e1 rc=$?"
  files+=("$R"/gathered_forced.jsonl)
fi
python3 dev/gemm/variants_table.py "${files[@]}" > "$R/table.md" 2>&1
cat "$R/table.md"
el "done"
pack
