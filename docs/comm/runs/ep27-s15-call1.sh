#!/usr/bin/env bash
# Session 15, ep27 call 1: what bounds the BF16 combine at 2 ranks after ep26 (combine chunk 8 the
# default). Measurement only, main's ep_bench (2c7b117, the lead's bundle of 02:42).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep27"], command="bash build-ep27/run.sh")
#   1. ep_bench --ab default, 3 rounds, FP8MOE_EP_TRACE=1: the defaults beside NCCL and the peer
#      copy of the same run, and each round's combine stamps (send_first_end, send_end, recv_end);
#   2. ncu --query-metrics: the NVLink metrics this ncu has on this GPU;
#   3. ncu (--clock-control none, kernel replay, --cache-control none) of the combine's send and
#      receive on GPU 0, the second round: SpeedOfLight, MemoryWorkloadAnalysis (+ tables),
#      WarpStateStats, SourceCounters, LaunchStats/Occupancy, DRAM bytes, and the NVLink bytes if
#      step 2 found metrics for them (a second pass, so that a refused metric costs only that).
#      Under ncu the launches are serialised (both ranks' sends before either receive), so each
#      kernel is measured alone: the send without the receive beside it, the receive with every
#      chunk already landed (its work, not its waits).
# Predictions: docs/comm/README.md "Session 15: the combine's bound after ep26 (ep27)".
# One archive back: $OUT/ep27_call1.tgz.
set -uo pipefail
bin=build-ep27/bin archive=build-ep27/ep_bench_main.tar.xz name=ep27_call1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
# shellcheck disable=SC2086 # COMMON is a list of arguments
FP8MOE_EP_TRACE=1 timeout 60 "$bin/ep_bench" --ab default --ab-rounds 3 $COMMON \
  --out "$R/ab.jsonl" --date "$d" > "$R/ab.log" 2>&1
el "1. ab+stamps rc=$?"; grep -E "^# ab normal|^# ab .*(nccl|peer)|ep_trace_combine" "$R/ab.log"
pack
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -1)
echo "ncu: $NCU"; "$NCU" --version | tail -1
"$NCU" --query-metrics --devices 0 > "$R/metrics_all.txt" 2>&1
grep -iE "nvl|peer" "$R/metrics_all.txt" > "$R/metrics_nvl.txt"
"$NCU" --list-sections > "$R/sections.txt" 2>&1
el "2. query: $(wc -l < "$R/metrics_nvl.txt") nvl/peer metric lines"; head -20 "$R/metrics_nvl.txt"
KR='regex:k_combine_send|k_combine_recv'
RUN=("$bin/ep_bench" --ncu --iters 2 --warmup 1 --blocks 64 --chunks 16 --no-check)
# One ncu run per kernel (the second round's launch on GPU 0), so that a receive stalled under
# replay costs only its own run.
for k in send recv; do
  timeout 100 "$NCU" --clock-control none --cache-control none --devices 0 \
    --kernel-name "regex:k_combine_$k" --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section SchedulerStats --section SourceCounters \
    --section LaunchStats --section Occupancy \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum,lts__t_bytes.sum \
    -f -o "$R/ncu_$k" "${RUN[@]}" > "$R/ncu_${k}_run.log" 2>&1
  el "3. ncu $k rc=$?"; tail -2 "$R/ncu_${k}_run.log"
  if [[ -f "$R/ncu_$k.ncu-rep" ]]; then
    "$NCU" -i "$R/ncu_$k.ncu-rep" --print-details all > "$R/ncu_$k.txt" 2>&1
    grep -E "^  k_|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|No Eligible|dram__bytes|Warp Cycles Per Issued" \
      "$R/ncu_$k.txt" | head -16
    "$NCU" -i "$R/ncu_$k.ncu-rep" --page source --print-source sass --csv > "$R/src_$k.csv" 2>&1
    gzip -f "$R/src_$k.csv"
  fi
  pack
done
# NVLink bytes: every nvl*/peer byte counter this ncu lists (one pass of metrics only).
nvm=$(grep -oE "^(nvl[a-z_]*__[a-z_]*bytes[a-z_]*|lts__t_[a-z_]*aperture_peer[a-z_]*)" "$R/metrics_all.txt" | sort -u | head -12 | sed 's/$/.sum/' | paste -sd, -)
if [[ -n $nvm ]]; then
  timeout 90 "$NCU" --clock-control none --cache-control none --devices 0 --kernel-name "$KR" \
    --launch-skip 2 --launch-count 2 --metrics "gpu__time_duration.sum,$nvm" -f -o "$R/ncu_nvl" \
    "${RUN[@]}" > "$R/ncu_nvl_run.log" 2>&1
  el "4. ncu nvl rc=$? ($nvm)"; tail -2 "$R/ncu_nvl_run.log"
  [[ -f "$R/ncu_nvl.ncu-rep" ]] && "$NCU" -i "$R/ncu_nvl.ncu-rep" --page raw --csv > "$R/ncu_nvl.csv" 2>&1 &&
    cat "$R/ncu_nvl.csv" | cut -c1-600 | head -8
else
  el "4. no nvl byte metrics listed"
fi
pack
el "done"
