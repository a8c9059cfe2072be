#!/usr/bin/env bash
# Prepared in session 14 for session 15 (lead): with ep22's layout_token_slots a default, the
# layout-only send no longer waits for the plan, so its chunk size and send grid (last swept in
# session 11 with the plan on the critical path: 16 tokens, 96 blocks for that send) may have moved.
# Times the defaults against :c8 / :c32 (chunk tokens) and :l64 / :l80 / :l112 (the layout-only
# send's grid, DeviceEpOptions::layout_send_blocks: 96 since session 11), two processes x 3
# rounds at 2 ranks, then one process at 4 ranks if the machine has 4 GPUs (kind nvidia-h100-x4;
# on x2 the 4-rank part is skipped). No code: ep_bench's suffixes.
# Binaries: the bundle of `bash scripts/gpu_bundle.sh` at main's head.
# Call: run(kind="nvidia-h100-x4" or "nvidia-h100-x2", carry=["build-bundle/bins.tar.xz"],
#           command="bash docs/comm/runs/ep-s15-layout-sweep.sh")   (~1.5 min wall + cold start)
# Predictions (written in session 14, before any run): layout only within +-1.5 % of the default at
# every point at 2 ranks (the send is bound by the link for ~95 us once it starts; the start was
# what f moved); c8 +2 to +6 % (twice the chunk flags and barriers, as session 2-3's c8), c32
# +1 to +4 % (a longer last wave); at 4 ranks l112 -1 to -3 % (more SMs storing to 3 peers).
# One archive back: $OUT/ep_s15_layout.tgz.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ep_s15_layout
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
variants=default,default:c8,default:c32,default:l64,default:l80,default:l112
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  CUDA_VISIBLE_DEVICES=0,1 timeout 120 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_x2_$i.jsonl" --date "$d" > "$R/ab_x2_$i.log" 2>&1
  el "2 ranks, process $i rc=$?"; grep -E "^# ab normal +dispatch_layout_only" "$R/ab_x2_$i.log"
  pack
done
if (($(nvidia-smi -L | grep -c '^GPU') >= 4)); then
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 200 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_x4.jsonl" --date "$d" > "$R/ab_x4.log" 2>&1
  el "4 ranks rc=$?"; grep -E "^# ab normal +dispatch_layout_only" "$R/ab_x4.log"
  pack
fi
el "done"
