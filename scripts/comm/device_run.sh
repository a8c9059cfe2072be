#!/usr/bin/env bash
# One device call for the comm module (kind nvidia-h100-x2, carry build-comm-dev from
# scripts/comm/build_bundle.sh): GPU tests against the CPU reference, then ep_bench with one rank
# per GPU and with two ranks per GPU. Logs and JSON lines go to $OUT.
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
timeout ${EP_TEST_TIMEOUT:-150} stdbuf -oL build-comm-dev/test_comm_gpu 2>&1 | tee "$out/test_comm_gpu.log" | grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) |Failure|error|Error|^  \.\. case" | tail -60
echo "test rc=${PIPESTATUS[0]}"
timeout ${EP_BENCH_TIMEOUT:-150} build-comm-dev/ep_bench --out "$out/ep.jsonl" --date "$date" --commit "$commit" 2>&1 | tee "$out/ep_bench.log"
echo "bench rc=${PIPESTATUS[0]}"
[[ ${EP_SKIP_BENCH2:-0} == 1 ]] && exit 0
timeout ${EP_BENCH2_TIMEOUT:-60} build-comm-dev/ep_bench --ranks-per-gpu 2 --blocks 24,48 --ll-blocks 32 --no-check --out "$out/ep.jsonl" --date "$date" --commit "$commit" 2>&1 | tee "$out/ep_bench_rpg2.log"
echo "bench2 rc=${PIPESTATUS[0]}"
