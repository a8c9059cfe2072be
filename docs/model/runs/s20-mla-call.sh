#!/usr/bin/env bash
# Session 20 (prepared for session 21): MlaBlockGpu (model/mla_block_gpu.h), the MLA attention
# block forward + backward, against the CPU pieces staged and end to end (tests), then the block's
# time at the V3 shape against the same block with BF16 projections (mla_block_bench, if built).
# Binaries: build-mla/bins.tar.xz (test_model_gpu [+ mla_block_bench]; branch s20-mla, stripped).
# Call: run(kind="nvidia-h100-x1", carry=["build-mla/bins.tar.xz"], command="bash docs/model/runs/s20-mla-call.sh", timeout_s=240)
set -uo pipefail
bin=build-mla/bin archive=build-mla/bins.tar.xz name=s20_mla
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -2 "$R/machine.txt"
timeout 90 "$bin/test_model_gpu" --gtest_filter='MlaBlockGpu*' > "$R/tests.log" 2>&1
el "1. MlaBlockGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|mla block|rel |bit-exact|DIFFERS|Expected|Which|seed|skipped" \
  "$R/tests.log" | cut -c1-160 | head -130
pack
if [[ -x $bin/mla_block_bench ]]; then
  timeout 100 "$bin/mla_block_bench" --out "$R/mla_block.jsonl" --date "$d" --commit s20-mla \
    > "$R/mla_block_bench.log" 2>&1
  el "2. mla_block_bench rc=$?"; tail -20 "$R/mla_block_bench.log"; pack
fi
el done
