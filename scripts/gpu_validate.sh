#!/usr/bin/env bash
# On a lent GPU machine, with build-bundle carried (scripts/gpu_bundle.sh): every GPU test binary
# (each compares its kernels with the CPU reference on fresh random inputs), then, unless
# GPU_VALIDATE_BENCH=0, the EP benchmark over all visible GPUs (extra flags: EP_BENCH_ARGS).
# EP_BENCH2_ARGS: a second ep_bench run (e.g. --ranks-per-gpu 2). GPU_TESTS="test_comm_gpu ..." limits the test binaries. Logs go to $OUT.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/gpu_validate}
mkdir -p "$out"
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
bin=build-bundle/bin
{ nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm --format=csv; nvidia-smi topo -m; } 2>&1 | tee "$out/machine.txt"
failed=0
for name in ${GPU_TESTS:-$(cd "$bin" && ls test_*_gpu)}; do
  t=$bin/$name
  timeout "${GPU_TEST_TIMEOUT:-240}" stdbuf -oL "$t" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc  $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$out/$name.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] [A-Za-z]|\|.*\|/\|ref\||rel\. ?err' "$out/$name.log" | head -20
  ((rc == 0)) || failed=1
done
if [[ ${GPU_VALIDATE_BENCH:-1} == 1 && -x $bin/ep_bench ]]; then
  timeout "${EP_BENCH_TIMEOUT:-240}" "$bin/ep_bench" --out "$out/ep.jsonl" --date "$(date -u +%F)" \
    --commit "${FP8MOE_COMMIT:-unknown}" ${EP_BENCH_ARGS:-} > "$out/ep_bench.log" 2>&1
  echo "ep_bench rc=$?"
  tail -40 "$out/ep_bench.log"
  if [[ -n ${EP_BENCH2_ARGS:-} ]]; then  # e.g. several ranks per GPU
    timeout "${EP_BENCH2_TIMEOUT:-90}" "$bin/ep_bench" --out "$out/ep.jsonl" --date "$(date -u +%F)" \
      --commit "${FP8MOE_COMMIT:-unknown}" $EP_BENCH2_ARGS > "$out/ep_bench2.log" 2>&1
    echo "ep_bench (${EP_BENCH2_ARGS}) rc=$?"
    tail -25 "$out/ep_bench2.log"
  fi
fi
exit $failed
