#!/usr/bin/env bash
# Session 20, call 3: LinearFp8Gpu (model/linear_gpu.h), the FP8 linear layer forward + backward,
# against the CPU reference (tests) and cuBLASLt BF16 (linear_bench).
# Binaries: build-lin/bins.tar.xz (test_model_gpu, linear_bench; main + the new files, stripped).
# Call: run(kind="nvidia-h200", carry=["build-lin/bins.tar.xz"], command="bash docs/model/runs/s20-call3-linear.sh")
set -uo pipefail
bin=build-lin/bin archive=build-lin/bins.tar.xz name=s20_call3
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -2 "$R/machine.txt"
timeout 150 "$bin/test_model_gpu" --gtest_filter='LinearFp8Gpu*' > "$R/tests.log" 2>&1
el "1. LinearFp8Gpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|linear fp8|Expected|Which|seed" "$R/tests.log" | cut -c1-200 | head -40
pack
timeout 200 "$bin/linear_bench" --out "$R/linear.jsonl" --date "$d" --commit s20-call3 > "$R/linear_bench.log" 2>&1
el "2. linear_bench rc=$?"; cat "$R/linear_bench.log" | tail -20; pack
el done
