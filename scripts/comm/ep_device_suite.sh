#!/usr/bin/env bash
# One device call that validates and measures expert parallelism on every visible GPU (and the
# GEMM on GPU 0), with binaries built here by `bash scripts/gpu_bundle.sh` and build-bundle/bin
# carried to the device. Steps (each logged to $OUT, each with its own time limit, so a hang in
# one leaves the others' results):
#   1. test_comm_gpu (every EP back end against the CPU reference, all GPUs, one process per GPU
#      too; SUITE_TEST_TIMEOUT seconds, 240)
#   2. ep_bench variant A/B (SUITE_AB, each variant timed every round, order rotating)
#   2b. ep_bench low-latency variant A/B (SUITE_LL_VARIANTS, e.g. "new,0,0N,0T,old")
#   3. ep_bench with the defaults: normal and low-latency shapes beside NCCL and the peer copy
#   4. ep_bench --gpus-per-node for each SUITE_XNODE entry (two-stage route against direct;
#      entries G or G:ranks_per_gpu; default: half the GPUs per node, i.e. 2 nodes, when the GPU
#      count is even; SUITE_XNODE=none skips), printing each run's "# cross-node summary" block
#      (or, if the run died before it, the rows it had printed)
#   5. test_kernels_gpu and test_moe_gpu on GPU 0 (SUITE_GEMM=0 skips); SUITE_SPLITK_REPEAT=N
#      repeats the split-K tests N more times (default 0: the suite already has a repeated-run test)
#   6. SUITE_NCU=1: ncu of the normal-mode send kernels (dispatch and combine, the defaults) on
#      GPU 0, per-instruction source counters with the SASS (receive kernels wait on the peer,
#      which a replaying profiler can stall)
# SUITE_COMM_TESTS=0 skips step 1 (a second pass of the suite over fewer GPUs, say).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/ep_suite}
mkdir -p "$out"
raw=$(mktemp -d)  # every log and JSON file; $OUT gets one archive of it (see pack)
bin=${SUITE_BIN:-build-bundle/bin}
t0=$(date +%s)
el() { echo $(($(date +%s) - t0)); }
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm --format=csv; nvidia-smi topo -m; } > "$raw/machine.txt" 2>&1
head -6 "$raw/machine.txt"
commit=${FP8MOE_COMMIT:-unknown}
day=$(date -u +%F)
# The device tool returns at most 8 files from $OUT: everything goes into one archive,
# refreshed after each step so that a call cut by its time limit still returns what ran.
pack() { tar czf "$out/ep_suite.tgz.tmp" -C "$raw" . && mv "$out/ep_suite.tgz.tmp" "$out/ep_suite.tgz"; }
bench() {  # bench NAME TIMEOUT ARGS...
  local name=$1 limit=$2
  shift 2
  echo "== [$(el) s] ep_bench $name: $*"
  timeout "$limit" "$bin/ep_bench" "$@" --out "$raw/$name.jsonl" --date "$day" --commit "$commit" > "$raw/$name.log" 2>&1
  echo "$name rc=$?"
  grep -E "MISMATCH|ep_bench:|error" "$raw/$name.log" | head -5
  pack
}
if [[ ${SUITE_COMM_TESTS:-1} == 1 ]]; then
  echo "== [$(el) s] test_comm_gpu"
  timeout "${SUITE_TEST_TIMEOUT:-240}" stdbuf -oL "$bin/test_comm_gpu" > "$raw/test_comm_gpu.log" 2>&1
  echo "test_comm_gpu rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]' "$raw/test_comm_gpu.log" | tr '\n' ' ')"
  grep -E "^\[  FAILED  \] [A-Za-z]|Failure|launch failed|HANG in|differs from the CPU reference" "$raw/test_comm_gpu.log" | head -12
  grep -E "^\[ +OK \]" "$raw/test_comm_gpu.log" | awk '{print $4, $5, $6}' | tr '\n' ' ' | head -c 3000
  echo
  pack
fi
if [[ -n ${SUITE_AB:-} ]]; then
  bench ab 150 --ab "$SUITE_AB" --ab-rounds "${SUITE_AB_ROUNDS:-3}" --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4
  grep -E "^# " "$raw/ab.log" | head -40
fi
if [[ -n ${SUITE_LL_VARIANTS:-} ]]; then
  bench ll_ab 150 --ab-ll "${SUITE_LL_ROUNDS:-6}" --ll-blocks 64 --ll-chunks 2 --iters 30 \
    --ll-variants "$SUITE_LL_VARIANTS"
  grep -E "^# ab_ll" "$raw/ll_ab.log" | head -40
fi
bench defaults 120 --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4
sed -n '/# summary/,$p' "$raw/defaults.log" | head -30
# The results table of docs/results/ep-*.md, made from the rows (never typed from the output).
python3 scripts/comm/ep_results_table.py "$raw/defaults.jsonl" | tee "$raw/defaults_table.md"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
xnode=${SUITE_XNODE:-}
if [[ -z $xnode && $gpus -ge 2 && $((gpus % 2)) -eq 0 ]]; then xnode=$((gpus / 2)); fi
[[ $xnode == none ]] && xnode=
for x in $xnode; do  # entries G or G:ranks_per_gpu
  g=${x%%:*}
  rpg=1
  [[ $x == *:* ]] && rpg=${x##*:}
  name="xnode_g${g}_r${rpg}"
  bench "$name" 150 --gpus-per-node "$g" --ranks-per-gpu "$rpg" --blocks 64 --chunks 16 --iters 8 --warmup 2
  if grep -q '^# cross-node summary' "$raw/$name.log"; then
    sed -n '/^# cross-node summary/,$p' "$raw/$name.log" | head -40
  else  # cut short: whatever rows it printed
    echo "$name: no cross-node summary; its rows:"
    grep -E '^(fp8moe|nccl|peer_copy)' "$raw/$name.log" | head -20
  fi
done
if [[ ${SUITE_GEMM:-1} == 1 ]]; then
  for t in test_kernels_gpu test_moe_gpu; do
    echo "== [$(el) s] $t (GPU 0)"
    CUDA_VISIBLE_DEVICES=0 timeout 200 stdbuf -oL "$bin/$t" > "$raw/$t.log" 2>&1
    echo "$t rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]' "$raw/$t.log" | tr '\n' ' ')"
    grep -E "^\[  FAILED  \] [A-Za-z]|Failure" "$raw/$t.log" | head -10
    pack
  done
  if [[ ${SUITE_SPLITK_REPEAT:-0} -gt 0 ]]; then
    echo "== [$(el) s] split-K tests x${SUITE_SPLITK_REPEAT} (GPU 0)"
    CUDA_VISIBLE_DEVICES=0 timeout 150 "$bin/test_kernels_gpu" --gtest_filter='*SplitK*' \
      --gtest_repeat="${SUITE_SPLITK_REPEAT}" > "$raw/splitk_repeat.log" 2>&1
    echo "split-K repeat rc=$? $(grep -cE '^\[  PASSED  \]' "$raw/splitk_repeat.log") passed runs"
    grep -E "^\[  FAILED  \] [A-Za-z]|Failure|rel_err" "$raw/splitk_repeat.log" | head -10
  fi
fi
if [[ ${SUITE_NCU:-0} == 1 ]] && command -v ncu > /dev/null; then
  echo "== [$(el) s] ncu of the normal-mode kernels (GPU 0)"
  timeout 120 ncu --clock-control none --kernel-name regex:'k_dispatch_send|k_combine_send' \
    --devices 0 --launch-skip 2 --launch-count 2 --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section LaunchStats --section Occupancy \
    --section MemoryWorkloadAnalysis -f -o "$raw/ncu_ep" \
    "$bin/ep_bench" --ncu --iters 2 --warmup 1 --blocks 64 --chunks 16 --no-check > "$raw/ncu_run.log" 2>&1
  echo "ncu rc=$?"
  if [[ -f "$raw/ncu_ep.ncu-rep" ]]; then
    ncu -i "$raw/ncu_ep.ncu-rep" --print-details all > "$raw/ncu_ep.txt" 2>&1
    grep -E "^  k_|Duration|Elapsed Cycles|Issue Slots Busy|No Eligible" "$raw/ncu_ep.txt" | head -40
    for k in k_dispatch_send k_combine_send; do
      ncu -i "$raw/ncu_ep.ncu-rep" --kernel-name "regex:$k" --launch-count 1 --page source \
        --print-source sass --csv > "$raw/src_$k.csv" 2>&1
      gzip -f "$raw/src_$k.csv"
    done
  fi
  pack
fi
echo "== [$(el) s] done"
pack
