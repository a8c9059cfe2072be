#!/usr/bin/env bash
# One device call for the comm module (carry build-comm-dev from scripts/comm/build_bundle.sh;
# kind nvidia-h100-x2, or nvidia-h200-x4 / nvidia-h100-x4 for 4 ranks: every GPU of the machine
# is one rank). GPU tests against the CPU reference first (no benchmark if they fail), then
# ep_bench with its block and chunk variants, then the previous kernel version's ep_bench if
# build-comm-dev/v4/ep_bench is there (same machine, same run: old against new), then two ranks
# per GPU. Logs and JSON lines go to $OUT. Knobs: EP_BENCH_ARGS (extra ep_bench flags),
# EP_SKIP_SERIAL=1 (no ablation runs), EP_SKIP_OLD=1, EP_SKIP_BENCH2=1, EP_*_TIMEOUT, EP_COMMIT, EP_DATE.
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/ep_out}
mkdir -p "$out"
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
date=${EP_DATE:-$(date -u +%F)}
commit=${EP_COMMIT:-unknown}
{ nvidia-smi --query-gpu=index,name,memory.total,clocks.sm --format=csv; nvidia-smi topo -m; ls "$nccl_lib"; } 2>&1 | tee "$out/machine.txt"
timeout ${EP_TEST_TIMEOUT:-150} stdbuf -oL build-comm-dev/test_comm_gpu 2>&1 | tee "$out/test_comm_gpu.log" | grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) |Failure|error|Error|Expected|Which is|^  \.\. case" | tail -60
test_rc=${PIPESTATUS[0]}
echo "test rc=$test_rc"
if [[ $test_rc != 0 ]]; then
  echo "GPU tests failed: no benchmark"
  exit 1
fi
timeout ${EP_BENCH_TIMEOUT:-200} build-comm-dev/ep_bench --out "$out/ep.jsonl" --date "$date" --commit "$commit" ${EP_BENCH_ARGS:-} 2>&1 | tee "$out/ep_bench.log"
echo "bench rc=${PIPESTATUS[0]}"
if [[ ${EP_SKIP_SERIAL:-0} != 1 ]]; then
  # Ablation at the default setting: receive kernels after their sends (no programmatic overlap).
  for flag in --no-overlap; do
    timeout ${EP_SERIAL_TIMEOUT:-60} build-comm-dev/ep_bench $flag --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --no-check --out "$out/ep_ablation.jsonl" --date "$date" --commit "$commit:$flag" 2>&1 | tee -a "$out/ep_bench_ablation.log" | grep -E "^# summary|^normal|^low_latency"
    echo "bench $flag rc=${PIPESTATUS[0]}"
  done
fi
if [[ -x build-comm-dev/v4/ep_bench && ${EP_SKIP_OLD:-0} != 1 ]]; then
  timeout ${EP_OLD_TIMEOUT:-90} build-comm-dev/v4/ep_bench --blocks 132,264 --ll-blocks 32,132 --iters 10 --no-check --out "$out/ep_v4.jsonl" --date "$date" --commit v4 2>&1 | tee "$out/ep_bench_v4.log" | grep -E "^fp8moe |^#"
  echo "bench v4 rc=${PIPESTATUS[0]}"
fi
[[ ${EP_SKIP_BENCH2:-0} == 1 ]] && exit 0
timeout ${EP_BENCH2_TIMEOUT:-60} build-comm-dev/ep_bench --ranks-per-gpu 2 --blocks 24,48 --chunks 32 --ll-blocks 16 --ll-chunks 4 --no-check --out "$out/ep.jsonl" --date "$date" --commit "$commit" 2>&1 | tee "$out/ep_bench_rpg2.log" | grep -E "^fp8moe |^#"
echo "bench2 rc=${PIPESTATUS[0]}"
