#!/usr/bin/env bash
# Session 13 (gemm24): the check of gemm23's gp1 landed as THE gathered producer (produce_gathered:
# thread 0 issues B's TMA, lane 0 of warp 1 the A scales', each posting its own bytes; the full
# barrier counts the 128 copy threads), before the lead's final validation; one H100.
# dev/gemm/NOTES.md "Session 13 — gemm23's gp1 measured and landed (gemm24)".
# Binaries: /work/main/build-gemm24/ (stripped, BUILD_INFO.txt; this script is build-gemm24/run.sh).
# Call: run(kind="nvidia-h100-x1", carry=["build-gemm24"], command="bash build-gemm24/run.sh")
#   1. test_kernels_gpu: the gathered GEMM's and the scale layout's tests under a 120 s timeout;
#   2. gemm_bench --only gathered once (default rounds): contiguous vs gathered at the four grouped
#      picks on the EP's record stride, bit for bit first.
# One archive back: $OUT/gemm24_call.tgz (table.md made by dev/gemm/variants_table.py).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM24_BIN:-build-gemm24} archive=build-gemm24/bins.tar.xz name=gemm24_call
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp "$bin/BUILD_INFO.txt" "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGatheredGpu.*:ScaleLayoutGpu.*' \
  > "$R/tests.log" 2>&1
rc=$?
el "1. gathered tests rc=$rc"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$R/tests.log"
pack
if [[ $rc == 0 ]]; then
  timeout 150 "$bin/gemm_bench" --only gathered --out "$R/gathered.jsonl" > "$R/bench.log" 2>&1
  el "2. bench rc=$?"
  python3 dev/gemm/variants_table.py "$R/gathered.jsonl" > "$R/table.md" 2>&1
  cat "$R/table.md"
fi
el "done"
pack
