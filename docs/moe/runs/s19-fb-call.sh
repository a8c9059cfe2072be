#!/usr/bin/env bash
# Session 19, s19-fb call: expert_ffn_bench (bench/gpu/expert_ffn_bench.cu) — ExpertFfnGpu's
# forward_contiguous / backward_contiguous at H 7168 x I 2048 as CUDA-graph replays from a cold
# L2, a per-step breakdown, and the naive composition (BF16 SwiGLU + quantize_1x128; elementwise
# SwiGLU backward) of the same run. Shapes a) 4 x 8192 rows, b) 32 x 1024, c) 128 experts x ~255
# (39168 padded rows), d) the tests' 768 rows. One GPU (GPU 0).
# Predictions: docs/moe/README.md, "The experts' FFN timed". Binary: build-fb/bins.tar.xz
# (BUILD_INFO.txt). Call: run(carry=["build-fb"], command="bash build-fb/run.sh", timeout_s=200);
# ~30-60 s wall expected, < 150 s worst case (the bench under timeout 120).
# One archive back: $OUT/fb_call1.tgz (bench.log, expert_ffn.jsonl, machine.txt).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=${FB_BIN:-build-fb/bin} archive=build-fb/bins.tar.xz name=fb_call1
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp build-fb/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv >> "$R/machine.txt" 2>&1

timeout 120 "$bin/expert_ffn_bench" --reps 30 --out "$R/expert_ffn.jsonl" --date "$d" \
  --commit "$(cut -d' ' -f1 build-fb/COMMIT 2> /dev/null || echo unknown)" > "$R/bench.log" 2>&1
rc=$?
el "1. expert_ffn_bench rc=$rc"
cat "$R/bench.log" | cut -c1-160
pack
el "done (rc $rc)"
exit "$rc"
