#!/usr/bin/env bash
# Session 21, s21-mg: ModelGpu (model/model_gpu.h), the whole V3-architecture model forward +
# backward on one GPU, against the CPU Model (kFp8); with it s21-dl's DecoderLayerGpu tests.
# Predictions and arithmetic: docs/model/README.md "ModelGpu (s21-mg)".
# Binaries: build-mg/bins.tar.xz (test_model_gpu, stripped; BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x1", carry=["build-mg"], command="bash build-mg/run.sh", timeout_s=240)
# (copy: docs/model/runs/s21-mg-call.sh; build-mg/ is git-ignored, so it travels by carry)
# One archive back: $OUT/s21_mg.tgz (tests.log, machine.txt). Expected < 3 min wall.
set -uo pipefail
bin=build-mg/bin archive=build-mg/bins.tar.xz name=s21_mg
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-mg/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -2 "$R/machine.txt"

timeout 150 "$bin/test_model_gpu" --gtest_filter='ModelGpu*:DecoderLayerGpu*' > "$R/tests.log" 2>&1
el "1. ModelGpu*:DecoderLayerGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|^loss|^grad all|^expert_load|^sgd|^status|^step time|Expected|Which|skipped|rel " \
  "$R/tests.log" | cut -c1-170 | head -260
pack
el done
