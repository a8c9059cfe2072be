#!/usr/bin/env bash
# Session 20, call 2: the k-grouped wgrad's device-layout form (groups read from the grouped
# layout on the device, no host counts) and ExpertFfnGpu::backward_contiguous's layout form.
# Binaries: build-kl/bins.tar.xz (test_kernels_gpu, test_moe_gpu of main + the change, stripped).
# Call: run(kind="nvidia-h200", carry=["build-kl/bins.tar.xz"], command="bash docs/kernels/runs/s20-call2-kgrouped-layout.sh")
set -uo pipefail
bin=build-kl/bin archive=build-kl/bins.tar.xz name=s20_call2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -2 "$R/machine.txt"
show() { grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|kgrouped|bit for bit|rel dx|differs" "$1" | cut -c1-220 | head -${2:-30}; }
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='Fp8WgradGpu.*' > "$R/wgrad.log" 2>&1
el "1. Fp8WgradGpu.* rc=$?"; show "$R/wgrad.log"; pack
timeout 150 "$bin/test_moe_gpu" --gtest_filter='ExpertFfnBackwardGpu.*' > "$R/backward.log" 2>&1
el "2. ExpertFfnBackwardGpu.* rc=$?"; show "$R/backward.log"; pack
el done
