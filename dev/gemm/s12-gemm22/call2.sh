#!/usr/bin/env bash
# Session 12, gemm22 call 2 (one GPU, kind nvidia-h200; call 1 ran this with the first heuristic on H100): stream-K (GemmTileConfig::stream_k,
# dev/gemm/NOTES.md "Session 12 — stream-K ..."). Binaries: /work/main/build-gemm22/
# (test_kernels_gpu, gemm_bench: stripped, BUILD_INFO.txt names the source; this script is
# build-gemm22/run.sh there). Call: run(kind="nvidia-h200", carry=["build-gemm22"],
# command="bash build-gemm22/run.sh").
#   1. test_kernels_gpu: the stream-K tests (their heuristic rows take stream-K where it is picked;
#      call 1 ran the split-K and tail-split tests too);
#   2. gemm_bench --only dense --m 128,64, twice: per shape the pick, the pick without a
#      workspace, the pick with pdl off, forced 128x128 split2 (the H200 pick before), 64x128
#      (the H100 pick), 128x128 and 64x128 stream-K, 128x128 stream-K on 112 CTAs (split2's work
#      distribution through the stream-K fix-up), cuBLASLt blockwise, 3 rotated rounds;
#   3. the table (dev/gemm/streamk_table.py) from the rows.
# One archive back: $OUT/gemm22_call1.tgz.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${GEMM22_BIN:-build-gemm22} archive=build-gemm22/none.tar.xz name=gemm22_call2
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp "$bin/BUILD_INFO.txt" "$bin/streamk_table.py" "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1
timeout 240 "$bin/test_kernels_gpu" \
  --gtest_filter='Fp8GemmGpuStreamK.*' \
  > "$R/tests.log" 2>&1
el "1. tests rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|runs differ" "$R/tests.log"
pack
for run in 1 2; do
  FP8MOE_BENCH_LEAN=1 FP8MOE_BENCH_SMALL_TILES=128x128k2q,64x128e1q,128x128zq,64x128zq,128x128zm112q \
    timeout 200 "$bin/gemm_bench" --only dense --m 128,64 --out "$R/small_run$run.jsonl" \
    > "$R/bench_run$run.log" 2>&1
  el "2. bench run $run rc=$?"
  pack
done
python3 "$bin/streamk_table.py" --old 128,7168,16384=split2 \
  "$R/small_run1.jsonl" "$R/small_run2.jsonl" > "$R/table.md" 2>&1
cat "$R/table.md"
el "done"
pack
