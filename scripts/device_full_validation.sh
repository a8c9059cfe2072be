#!/usr/bin/env bash
# One device call that validates everything GPU-side on a machine of 2 or more GPUs, with the
# binaries of `bash scripts/gpu_bundle.sh` carried as build-bundle/bin:
#   A. on the last GPU: test_kernels_gpu, test_moe_gpu, then gemm_bench (unless FULL_GEMM_BENCH=0)
#      -> $OUT/gemm.tgz; at the same time on GPUs 0 and 1: the EP suite without its tests (A/B of
#      FULL_AB if set, the defaults; the two-stage route if FULL_XNODE2 is set) -> $OUT/x2
#   B. then, with 4 or more GPUs, the EP suite on every GPU (test_comm_gpu, A/B of FULL_AB_ALL if
#      set, the defaults; the two-stage route if FULL_XNODE is set, e.g. "2") -> $OUT/xN
# The GEMM bench runs beside the 2-GPU EP benches on another GPU of the same host: its rows carry
# the SM clock; compare its ratios (ours / cuBLASLt of the same run), not its absolute times, with
# runs on an idle host. FP8MOE_COMMIT names the build in every row. NCCL_NVLS_ENABLE=0 throughout.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/full_validation}
bin=build-bundle/bin
gpus=$(nvidia-smi -L | grep -c '^GPU')
last=$((gpus - 1))
gemm_dir=$(mktemp -d)
(
  for t in test_kernels_gpu test_moe_gpu; do
    CUDA_VISIBLE_DEVICES=$last timeout 300 stdbuf -oL "$bin/$t" > "$gemm_dir/$t.log" 2>&1
    echo "$t rc=$?" >> "$gemm_dir/summary.txt"
  done
  if [[ ${FULL_GEMM_BENCH:-1} == 1 ]]; then
    CUDA_VISIBLE_DEVICES=$last timeout 240 "$bin/gemm_bench" --out "$gemm_dir/gemm.jsonl" \
      > "$gemm_dir/gemm_bench.log" 2>&1
    echo "gemm_bench rc=$?" >> "$gemm_dir/summary.txt"
  fi
  tar czf "$out/gemm.tgz" -C "$gemm_dir" .
) &
gemm_pid=$!
echo "#### EP on GPUs 0,1 (beside the GEMM tests on GPU $last)"
OUT=$out/x2 CUDA_VISIBLE_DEVICES=0,1 SUITE_COMM_TESTS=0 SUITE_GEMM=0 SUITE_AB=${FULL_AB:-} \
  SUITE_XNODE=${FULL_XNODE2:-none} bash scripts/comm/ep_device_suite.sh
wait $gemm_pid
echo "#### GEMM (GPU $last)"
cat "$gemm_dir/summary.txt"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|runs differ" "$gemm_dir"/test_*.log | head -30
grep -E "^dense +fp8moe +m=" "$gemm_dir/gemm_bench.log" 2>/dev/null | awk '{print $3, $4, $5, $7, $8, $13, $14, $NF}' | head -20
grep -E "^(grouped_contiguous|grouped_masked|wgrad|kgrouped_wgrad) " "$gemm_dir/gemm_bench.log" 2>/dev/null | awk '{print $1, $2, $3, $4, $5, $6, $9, $10}' | head -12
if ((gpus >= 4)); then
  echo "#### EP on all $gpus GPUs"
  OUT=$out/x$gpus SUITE_GEMM=0 SUITE_TEST_TIMEOUT=280 SUITE_AB=${FULL_AB_ALL:-} \
    SUITE_XNODE=${FULL_XNODE:-none} bash scripts/comm/ep_device_suite.sh
fi
