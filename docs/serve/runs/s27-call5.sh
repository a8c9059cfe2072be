#!/usr/bin/env bash
# Session 27 call 5 (one GPU): where one MoE layer's decoding step spends its time at 1 and 32
# tokens (v3-slice, one rank, the low-latency masked form): ncu's per-kernel duration and DRAM
# bytes of moe_decode_bench's eager forwards (and the first graph replays), caches flushed per
# kernel (ncu's default), so the weight streams read from DRAM as in decoding.
# Call: run(kind="nvidia-h100-x1", carry=["build-s27/bins4.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s27-call5.sh", timeout_s=400)
set -uo pipefail
bin=build-s27/bin4 archive=build-s27/bins4.tar.xz name=s27_c5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
export CUDA_VISIBLE_DEVICES=0
ncu=/usr/local/cuda/bin/ncu
for t in 1 32; do
  timeout 150 $ncu --csv --page raw --launch-count 120 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__block_size \
    "$bin/moe_decode_bench" --ranks 1 --shapes v3-slice --tokens $t --iters 1 --reps 1 \
    > "$R/ncu_v3slice_t$t.csv" 2> "$R/ncu_v3slice_t$t.err"
  el "ncu tokens $t rc=$?"; wc -l "$R/ncu_v3slice_t$t.csv"; tail -3 "$R/ncu_v3slice_t$t.err"
  pack
done
el done
