#!/usr/bin/env bash
# Session 23's final validation call, on 2 GPUs: every GPU test binary this session's code reaches
# (comm and moe are unchanged since session 22's final validation, and their binaries do not fit
# the device's 64 MiB carry beside the others): test_kernels_gpu on GPU 1 beside test_model_gpu
# and test_serve_gpu on GPU 0, then test_train_gpu on both (its several-GPU tests).
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins-tests.tar.xz", "build-bundle/lib"],
#           command="bash scripts/device_final_s23.sh", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:${nccl_lib}:${LD_LIBRARY_PATH:-}
bin=build-bundle/bin
mkdir -p "$bin" && tar xJf build-bundle/bins-tests.tar.xz -C "$bin"
out=${OUT:-/tmp/final_s23}
logs=$(mktemp -d)
t0=$(date +%s)
nvidia-smi -L > "$logs/machine.txt"
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure" "$1" | head -12; }
run_on() {  # run_on GPU binary...
  local gpu=$1
  shift
  for t in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu timeout 400 "$bin/$t" > "$logs/$t.log" 2>&1
    echo "$t rc=$? ($(($(date +%s) - t0)) s)" >> "$logs/rc.txt"
  done
}
run_on 1 test_kernels_gpu &
run_on 0 test_model_gpu test_serve_gpu
wait
timeout 300 "$bin/test_train_gpu" > "$logs/test_train_gpu.log" 2>&1
echo "test_train_gpu (2 GPUs) rc=$? ($(($(date +%s) - t0)) s)" >> "$logs/rc.txt"
cat "$logs/rc.txt"
for t in test_kernels_gpu test_model_gpu test_serve_gpu test_train_gpu; do
  echo "== $t"
  summary "$logs/$t.log"
done
mkdir -p "$out" && tar czf "$out/tests.tgz" -C "$logs" .
