#!/usr/bin/env bash
# Session 24 call (prepared by s24-sample): token sampling on the GPU (kernels/sampling.h).
#   1. test_kernels_gpu --gtest_filter='Sampling*' under timeout 120: GPU tokens EQUAL the CPU
#      reference's (every "[ sampling ]" line: mismatches 0), speculative token/kept/bonus too;
#   2. sampling_bench: rows {1,8,64,256} x vocab {32000,129280} x {greedy, T 0.8 top_p 0.9},
#      fp8moe vs naive vs host_copy (the generator's current way); JSON lines.
# Binaries: build-s/bins.tar.xz (stripped; BUILD_INFO.txt). Call:
#   run(carry=["build-s/run.sh", "build-s/bins.tar.xz", "build-s/BUILD_INFO.txt"],
#       command="bash build-s/run.sh", timeout_s=240); ~40-100 s wall expected.
# One archive back: $OUT/s24_sample.tgz. Docs: docs/kernels/sampling.md (PREDICTIONS).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$here
while [[ ! -f $root/scripts/device_call_prologue.sh && $root != / ]]; do root=$(dirname "$root"); done
bin=build-s/bin archive=build-s/bins.tar.xz name=s24_sample
# shellcheck source=scripts/device_call_prologue.sh
source "$root/scripts/device_call_prologue.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
cp build-s/BUILD_INFO.txt "$R/" 2> /dev/null
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv >> "$R/machine.txt" 2>&1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1 | grep -oiE 'h100|h200' | tr 'A-Z' 'a-z')
gpu=${gpu:-gpu}
commit=$(awk '/^commit:/ {print $2; exit}' build-s/BUILD_INFO.txt 2> /dev/null)

timeout 120 "$bin/test_kernels_gpu" --gtest_filter='Sampling*' > "$R/test_sampling.log" 2>&1
el "1. test_kernels_gpu Sampling* rc=$?"
grep -E "^\[ sampling \]|^\[  (PASSED|FAILED)|FAILED  \]|Failure|no CUDA" "$R/test_sampling.log" | head -40
pack

timeout 100 "$bin/sampling_bench" --out "$R/sampling-$d-$gpu.jsonl" --date "$d" \
  --commit "${commit:-unknown}" > "$R/sampling_bench.log" 2>&1
el "2. sampling_bench rc=$?"
cat "$R/sampling_bench.log" | head -60
pack
el "done"
