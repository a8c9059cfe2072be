#!/usr/bin/env bash
# Session 12, first GEMM call (prepared by gemm20 at the end of session 11, not run): the lean
# gathered producer (GemmTileConfig::gather_producer 7, dev/gemm/NOTES.md "Session 11 late — a
# leaner gathered producer, prepared (gemm20)") against the landed one, one GPU.
# Binaries: /work/main/build-gemm20/ (test_kernels_gpu, gemm_bench: stripped, BUILD_INFO.txt names
# the source; this script is build-gemm20/run.sh there).
# Call: run(kind="nvidia-h100-x1", carry=["build-gemm20"], command="bash build-gemm20/run.sh")
#   (~2 min wall expected; name the card of the reply in every number).
#   1. test_kernels_gpu: the gathered tests with the lean producer's (Producer7EqualsContiguous)
#      alone first under a timeout (if it fails or hangs, step 2 times the landed producer only);
#   2. gemm_bench --only gathered, twice, 7 rounds, rotated in one process at the four grouped picks
#      on the EP dispatch's record stride (7392 / 2112): contiguous, landed gathered, p7;
#   3. forced 128x256 with the register epilogue (4 stages: the lean producer's depth-2 loop), 5
#      rounds; tables by dev/gemm/variants_table.py from the rows.
# One archive back: $OUT/gemm_s12_call1.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM20_BIN:-build-gemm20} archive=build-gemm20/bins.tar.xz name=gemm_s12_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp "$bin/BUILD_INFO.txt" "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGatheredGpu.Producer7EqualsContiguous' \
  > "$R/test_p7.log" 2>&1
p7=$?
el "1. Producer7EqualsContiguous rc=$p7"; grep -E "^\[  (PASSED|FAILED)" "$R/test_p7.log"
timeout 150 "$bin/test_kernels_gpu" \
  --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*:-Fp8GemmGatheredGpu.Producer7EqualsContiguous' \
  > "$R/tests.log" 2>&1
el "1. gathered tests rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/tests.log"
pack
producers=""
[[ $p7 == 0 ]] && producers=7
for run in 1 2; do
  FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=7 timeout 150 \
    "$bin/gemm_bench" --only gathered --out "$R/gathered_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"; grep -v "^gather_scales" "$R/bench_run$run.log" | cut -c1-160 | tail -16
  pack
done
FP8MOE_BENCH_GATHER_PRODUCERS=$producers FP8MOE_BENCH_GROUPED_ROUNDS=5 \
  FP8MOE_BENCH_GATHERED_TILES=128x256e1q timeout 150 "$bin/gemm_bench" --only gathered \
  --out "$R/gathered_forced.jsonl" > "$R/bench_forced.log" 2>&1
el "3. bench forced 128x256e1 rc=$?"
python3 dev/gemm/variants_table.py "$R"/gathered_run1.jsonl "$R"/gathered_run2.jsonl \
  "$R"/gathered_forced.jsonl > "$R/table.md" 2>&1
cat "$R/table.md"
el "done"
pack
