#!/usr/bin/env bash
# Session 21, helper s21-dl: DecoderLayerGpu (model/decoder_layer_gpu.h) — one V3 decoder layer
# forward + backward on the GPU: its test (dense + MoE layer, staged checks against the CPU
# pieces, graph replay, overwrite == accumulate, bad shapes), then the LinearFp8Gpu / MlaBlockGpu
# tests as a regression check of the transpose refactor (transpose_fp8_weight_blocks).
# Binaries: build-dl/bins.tar.xz (test_model_gpu, branch s21-dl, stripped).
# Call: run(kind="nvidia-h100-x1", carry=["build-dl"], command="bash build-dl/run.sh", timeout_s=240)
set -uo pipefail
bin=build-dl/bin archive=build-dl/bins.tar.xz name=s21_dl
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -2 "$R/machine.txt"
timeout 120 "$bin/test_model_gpu" --gtest_filter='DecoderLayerGpu*' > "$R/tests.log" 2>&1
el "1. DecoderLayerGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|rel |router|balance|df vs|dgate|layer \(|bit|Expected|Which|seed|skipped|grad " \
  "$R/tests.log" | cut -c1-160 | head -120
pack
timeout 60 "$bin/test_model_gpu" --gtest_filter='LinearFp8Gpu*:MlaBlockGpu*' > "$R/regress.log" 2>&1
el "2. LinearFp8Gpu*:MlaBlockGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|skipped" "$R/regress.log" | cut -c1-160 | head -30
pack
el done
