#!/usr/bin/env bash
# Session 21 call 3: (a) s21-dl's DecoderLayerGpu call (build-dl/run.sh), then (b) main with the
# wgmma attention backward as the default: the attention tests, attention_bench, MlaBlockGpu's
# test and mla_block_bench (the block's backward with the new default).
# Call: run(carry=["build-dl", "build-at2/bins.tar.xz"], command="bash docs/kernels/runs/s21-call3.sh", timeout_s=300)
set -uo pipefail
OUT0=${OUT:-/tmp/s21c3}
OUT=$OUT0 bash build-dl/run.sh
bin=build-at2/bin archive=build-at2/bins.tar.xz name=s21_at2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
timeout 90 "$bin/test_kernels_gpu" --gtest_filter='MlaAttentionGpu*' > "$R/attn_tests.log" 2>&1
el "3. MlaAttentionGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/attn_tests.log" | head -10
timeout 60 "$bin/test_model_gpu" --gtest_filter='MlaBlockGpu*' > "$R/mla_tests.log" 2>&1
el "4. MlaBlockGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|e2e|dq |dkv " "$R/mla_tests.log" | cut -c1-120 | head -20
pack
timeout 60 "$bin/attention_bench" --date "$d" --commit s21-default-wgmma --out "$R/attention.jsonl" > "$R/attention_bench.log" 2>&1
el "5. attention_bench rc=$?"; head -14 "$R/attention_bench.log"
timeout 60 "$bin/mla_block_bench" --date "$d" --commit s21-default-wgmma --out "$R/mla_block.jsonl" > "$R/mla_block_bench.log" 2>&1
el "6. mla_block_bench rc=$?"; tail -6 "$R/mla_block_bench.log"
pack
el done
