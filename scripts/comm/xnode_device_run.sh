#!/usr/bin/env bash
# One device call for the cross-node (two-stage) route, kind nvidia-h100-x2: here
# `bash scripts/gpu_bundle.sh` (or just its test_comm_gpu and ep_bench targets), then copy
# build-bundle/bin and this script into an ignored folder of the shipped checkout (e.g.
# build-epxnode/) and run `bash build-epxnode/xnode_device_run.sh` there with that folder carried.
# The GPU tests of the route against the CPU reference first (no benchmark if they fail), then
# ep_bench --gpus-per-node: 2 nodes x 1 rank (one rank per GPU) and 2 nodes x 2 ranks (two ranks
# per GPU, a node per GPU), two-stage (network hop over NVLink stores and over NCCL) against the
# direct route. Logs and JSON lines go to $OUT. Knobs: XNODE_TESTS (gtest filter), XNODE_ITERS,
# XNODE_SKIP_BENCH=1, XNODE_COMMIT.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/xnode_out}
mkdir -p "$out"
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
bin=$here/bin
{ nvidia-smi --query-gpu=index,name,memory.total,clocks.sm --format=csv; nvidia-smi topo -m; } > "$out/machine.txt" 2>&1
head -3 "$out/machine.txt"
# One process per group of tests, so that a hang (the tests stop themselves with every rank's
# flags) still leaves the other groups' results.
groups=${XNODE_TESTS:-'NvlinkTest.GraphCapturedRoundReplays:ForwardTest.*'}
failed=0
for filter in $groups; do
  start=$(date +%s)
  timeout ${XNODE_TEST_TIMEOUT:-90} stdbuf -oL "$bin/test_comm_gpu" --gtest_filter="$filter" > "$out/test.log.tmp" 2>&1
  rc=$?
  cat "$out/test.log.tmp" >> "$out/test_comm_gpu.log"
  echo "test $filter rc=$rc ($(( $(date +%s) - start )) s)"
  if [[ $rc != 0 ]]; then
    failed=1
    grep -E "Failure|Error|error|Expected|Which is|Value of|HANG|^  rank|took" "$out/test.log.tmp" | head -40
    tail -6 "$out/test.log.tmp"
  else
    grep -E "^\[ +(OK|PASSED) |took" "$out/test.log.tmp" | head -12
  fi
done
rm -f "$out/test.log.tmp"
if [[ $failed != 0 ]]; then
  echo "GPU tests failed: no benchmark"
  exit 1
fi
[[ ${XNODE_SKIP_BENCH:-0} == 1 ]] && exit 0
date=$(date -u +%F)
commit=${XNODE_COMMIT:-unknown}
iters=${XNODE_ITERS:-8}
for args in "--gpus-per-node 1" "--gpus-per-node 2 --ranks-per-gpu 2"; do  # direct at --blocks 64
  start=$(date +%s)
  timeout ${XNODE_BENCH_TIMEOUT:-45} "$bin/ep_bench" $args --blocks 64 --chunks 16 --iters "$iters" --warmup 2 \
    --out "$out/ep-xnode.jsonl" --date "$date" --commit "$commit" > "$out/bench.log.tmp" 2>&1
  rc=$?
  cat "$out/bench.log.tmp" >> "$out/ep_bench.log"
  echo "ep_bench $args rc=$rc ($(( $(date +%s) - start )) s)"
  grep -vE "^#? *$" "$out/bench.log.tmp" | tail -22
done
rm -f "$out/bench.log.tmp"
