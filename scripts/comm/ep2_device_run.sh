#!/usr/bin/env bash
# One device call for the plan-once A/B and the send-kernel profile (kind nvidia-h100-x2, carry
# the folder this script sits in, with test_comm_gpu and ep_bench from scripts/comm/build_bundle.sh
# built with EP_BUILD_OUT=<that folder>). In order: the GPU tests against the CPU reference (stop
# if they fail); ep_bench --ab-plan (plan in every send block vs plan_once, alternated, normal and
# low-latency FP8 with NCCL and the peer copy of the same run); ncu of k_dispatch_send and
# k_combine_send (v5 path) and of k_dispatch_plan + k_dispatch_send (plan_once), clocks left alone.
# Everything is bounded so the whole run stays near 150-170 s. Logs to $OUT.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/ep2_out}
mkdir -p "$out"
work=$(mktemp -d)
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
log="$out/run.log"
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm --format=csv; nvidia-smi topo -m; command -v ncu; } >"$log" 2>&1
cat "$log"

echo "== [$(elapsed) s] test_comm_gpu" | tee -a "$log"
timeout 70 stdbuf -oL "$here/test_comm_gpu" >"$out/test_comm_gpu.log" 2>&1
test_rc=$?
grep -E "^\[ +(OK|FAILED|PASSED) |Failure|Expected|Which is" "$out/test_comm_gpu.log" | tail -30 | tee -a "$log"
echo "test rc=$test_rc" | tee -a "$log"
if [[ $test_rc != 0 ]]; then
  echo "GPU tests failed: no benchmark" | tee -a "$log"
  exit 1
fi

echo "== [$(elapsed) s] ep_bench --ab-plan" | tee -a "$log"
timeout 90 "$here/ep_bench" --ab-plan ${AB_ROUNDS:-4} --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 \
  --out "$out/ab.jsonl" --date "$(date -u +%F)" --commit "${EP_COMMIT:-65121c6+plan_once}" >"$out/ab.log" 2>&1
echo "bench rc=$?" | tee -a "$log"
grep -E "^#|MISMATCH|bit-exact|^nccl|^peer_copy" "$out/ab.log" | tee -a "$log"

sections=(--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters
          --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis)
if command -v ncu >/dev/null; then
  left=$(( 150 - $(elapsed) ))
  echo "== [$(elapsed) s] ncu v5 path (k_dispatch_send, k_combine_send), limit ${left} s" | tee -a "$log"
  if (( left > 30 )); then
    timeout $left ncu --clock-control none --kernel-name regex:'k_dispatch_send|k_combine_send' \
 --devices 0 --launch-skip 1 --launch-count 2 "${sections[@]}" -f -o "$work/ncu_v5" \
      "$here/ep_bench" --ncu --iters 1 --warmup 0 --blocks 64 --chunks 16 --no-check >"$work/ncu_v5_run.log" 2>&1
    echo "ncu rc=$?" | tee -a "$log"
    grep -E "==PROF==|==ERROR==|==WARNING==" "$work/ncu_v5_run.log" | head -20 | tee -a "$log"
    if [[ -f "$work/ncu_v5.ncu-rep" ]]; then
      ncu -i "$work/ncu_v5.ncu-rep" --print-details all >"$out/ncu_v5.txt" 2>&1
      grep -E "k_dispatch_send|k_combine_send|Duration|Elapsed Cycles|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Stall (Long Scoreboard|Barrier|Wait|Membar|LG Throttle|Drain|Short Scoreboard|MIO Throttle|Math Pipe|Not Selected|Branch|Sleeping|Lg)" "$out/ncu_v5.txt" | head -80 | tee -a "$log"
      for k in k_dispatch_send k_combine_send; do
        ncu -i "$work/ncu_v5.ncu-rep" --kernel-name "regex:$k" --launch-count 1 --page source --print-source sass --csv >"$work/src_$k.csv" 2>&1
      done
    fi
  fi
  left=$(( 165 - $(elapsed) ))
  echo "== [$(elapsed) s] ncu plan_once (k_dispatch_plan, k_dispatch_send), limit ${left} s" | tee -a "$log"
  if (( left > 20 )); then
    timeout $left ncu --clock-control none --kernel-name regex:'k_dispatch_plan|k_dispatch_send' \
      --devices 0 --launch-skip 2 --launch-count 2 --section SpeedOfLight --section WarpStateStats --section LaunchStats \
      -f -o "$work/ncu_once" "$here/ep_bench" --ncu --plan-once --iters 1 --warmup 0 --blocks 64 --chunks 16 \
      --no-check >"$work/ncu_once_run.log" 2>&1
    echo "ncu rc=$?" | tee -a "$log"
    grep -E "==PROF==|==ERROR==" "$work/ncu_once_run.log" | head -10 | tee -a "$log"
    [[ -f "$work/ncu_once.ncu-rep" ]] && ncu -i "$work/ncu_once.ncu-rep" --print-details all >"$out/ncu_once.txt" 2>&1
    grep -E "k_dispatch|Duration|Elapsed Cycles" "$out/ncu_once.txt" 2>/dev/null | head -12 | tee -a "$log"
  fi
  # SASS with source lines, to map the per-instruction samples of src_*.csv onto the code.
  if command -v cuobjdump >/dev/null; then
    (cd "$work" && cuobjdump -xelf all "$here/ep_bench" >/dev/null 2>&1
     for c in "$work"/*.cubin; do nvdisasm -g -c "$c" >"$c.sass" 2>/dev/null; done) || true
  fi
  tar -czf "$out/ncu.tgz" --exclude='*.cubin' -C "$work" . 2>/dev/null
fi
echo "== [$(elapsed) s] done" | tee -a "$log"
ls -la "$out" | tee -a "$log"
