#!/usr/bin/env bash
# Session 22's final validation call, as it ran: phase 1 of scripts/device_full_validation.sh
# (every GPU test: test_comm_gpu on both GPUs, the other binaries on the last GPU), then the
# trainer's several-GPU tests, which need every GPU (phase 1 gave the other binaries one; phase 1
# runs them itself since, so later sessions need only device_full_validation.sh).
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins-tests.tar.xz", "build-bundle/lib"],
#           command="FP8MOE_COMMIT=<sha> bash scripts/device_final_s22.sh", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mkdir -p build-bundle/bin && tar xJf build-bundle/bins-tests.tar.xz -C build-bundle/bin
FULL_PHASES=1 FULL_TEST_SHARD=0/1 FULL_TEST_TIMEOUT=470 bash scripts/device_full_validation.sh
export NCCL_NVLS_ENABLE=0
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:${nccl_lib}:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/full_validation}
timeout 100 build-bundle/bin/test_train_gpu --gtest_filter='TrainerGpuParallel*' \
  > "$out/train_parallel.log" 2>&1
echo "== trainer several-GPU tests rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|step [0-9]|worst|Expected|Which" \
  "$out/train_parallel.log" | cut -c1-200 | head -30
