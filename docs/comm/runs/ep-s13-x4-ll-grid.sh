#!/usr/bin/env bash
# Session 13: the low-latency send grid at 2 and 4 ranks. The stamps of ep-s13-x4-ll-stamps.sh put
# the 4-rank growth of the LL dispatch (23.2 -> 32.4 us on H200) in the send's payload phase
# (7.5-8.6 -> 14.5-16.0 us: ~2.7x the bytes from the same 64 send blocks). This call times the
# defaults ("new") on send grids of 48 / 64 / 80 / 96 blocks (the receive gets the other SMs), 6
# alternated rounds, at 2 and at 4 ranks. docs/comm/README.md "Session 13: the low-latency stamps".
# Binaries: the bundle of `bash scripts/gpu_bundle.sh` (the LL kernels of the tree).
# Call: run(kind="nvidia-h100-x4", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s13-x4-ll-grid.sh")   (~1 min wall + cold start)
# One archive back: $OUT/ep_s13_ll_grid.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ep_s13_ll_grid
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
for gpus in 0,1,2,3 0,1; do
  n=$(tr -cd , <<< "$gpus" | wc -c); n=$((n + 1))
  CUDA_VISIBLE_DEVICES=$gpus timeout 150 "$bin/ep_bench" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 \
    --iters 30 --ll-variants new,new:b48,new:b80,new:b96 \
    --out "$R/ll_grid_x$n.jsonl" --date "$d" > "$R/ll_grid_x$n.log" 2>&1
  el "ranks $n rc=$?"; grep -E "^# ab" "$R/ll_grid_x$n.log" | head -12
  pack
done
el "done"
