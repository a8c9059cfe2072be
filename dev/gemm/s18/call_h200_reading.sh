#!/usr/bin/env bash
# Session 18: the third H200 bench reading of 128x64 against the split2 pick at M = 128 (session
# 17: call 4 read 1.02-1.03x of split2's time, call 11 0.95-0.96x). Main's bundle (build-bundle/
# bins.tar.xz, the session-17 final's binaries: the 128x64 rule in). Two lean dense runs at M = 128
# with the two tiles forced beside the pick and cuBLASLt blockwise; table by tile128x64_table.py.
# Rule (dev/gemm/NOTES.md "Session 18"): 128x64 <= 0.97x split2 in both runs -> the rule takes
# H200's split2 pick too at 128 x 7168 x 16384; otherwise it stays.
# Call: chained after another script on GPU 0 of the lent machine, or alone:
#   run(kind="nvidia-h200", carry=["build-bundle/bins.tar.xz"], command="bash dev/gemm/s18/call_h200_reading.sh")
set -uo pipefail
bin=build-bundle/bin-s18g archive=build-bundle/bins.tar.xz name=gemm_s18_h200
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export CUDA_VISIBLE_DEVICES=0
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
head -4 "$R/machine.txt"
tiles=128x64e0w1q,128x64e0w2q,128x128k2w2q
for run in 1 2; do
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=$tiles timeout 70 "$bin/gemm_bench" \
    --only dense --m 128 --out "$R/small_run$run.jsonl" > "$R/bench_run$run.log" 2>&1
  el "bench run $run rc=$?"
  pack
done
python3 dev/gemm/tile128x64_table.py "$R"/small_run*.jsonl > "$R/table.md" 2>&1
grep -A14 "7168 x 16384" "$R/table.md" | head -34
el "done"
pack
