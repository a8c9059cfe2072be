#!/usr/bin/env bash
# Session 22, call 4: 300-step runs of configs/small-gpu.json on one GPU and on two (losses and
# held-out loss side by side, the CLI's steady tokens/s), and where a V3-width step's time goes
# (nsys's kernel summary, if the machine has nsys). Binaries as s22-call3.sh's.
# Call: run(kind="nvidia-h100-x2", carry=["build-s22/bins.tar.xz", "build-s22/lib"],
#           command="bash docs/train/runs/s22-call4.sh", timeout_s=400)
set -uo pipefail
bin=build-s22/bin archive=build-s22/bins.tar.xz name=s22_call4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-s22/lib:$LD_LIBRARY_PATH
head -3 "$R/machine.txt"
small=(--config configs/small-gpu.json --steps 300 --batch 16 --seq 256 --no-progress)
timeout 100 "$bin/fp8moe" train --device gpu "${small[@]}" --out /tmp/s22-s300-1 > "$R/s300_1.log" 2>&1
el "1. small-gpu 300 steps, 1 GPU rc=$?"; tail -1 "$R/s300_1.log"
cp /tmp/s22-s300-1/metrics.jsonl "$R/metrics_s300_1.jsonl"; cp /tmp/s22-s300-1/loss.svg "$R/loss_s300_1.svg"
pack
timeout 120 "$bin/fp8moe" launch -n 2 -- "$bin/fp8moe" train --device gpu "${small[@]}" \
  --out /tmp/s22-s300-2 > "$R/s300_2.log" 2>&1
el "2. small-gpu 300 steps, 2 GPUs rc=$?"; grep -v "^\[rank 1\]" "$R/s300_2.log" | tail -1
cp /tmp/s22-s300-2/metrics.jsonl "$R/metrics_s300_2.jsonl"; cp /tmp/s22-s300-2/loss.svg "$R/loss_s300_2.svg"
ls -la /tmp/s22-s300-2/ > "$R/s300_2_files.txt"
pack
nsys_bin=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${nsys_bin:-none}"
if [[ -n $nsys_bin ]]; then
  v3=(--config configs/v3-slice.json --steps 8 --batch 2 --seq 2048 --warmup 5 --no-checkpoint --eval-batches 0 --no-progress)
  timeout 150 "$nsys_bin" profile -o /tmp/s22-prof --force-overwrite true --trace cuda \
    "$bin/fp8moe" train --device gpu "${v3[@]}" --out /tmp/s22-prof-run > "$R/nsys.log" 2>&1
  el "3. nsys v3-slice 1 GPU rc=$?"
  timeout 120 "$nsys_bin" stats --report cuda_gpu_kern_sum --format csv -o /tmp/s22-kern /tmp/s22-prof.nsys-rep > /dev/null 2>&1
  cp /tmp/s22-kern*.csv "$R/" 2>/dev/null
  python3 - "$R" <<'PY'
import csv, glob, sys
f = sorted(glob.glob(sys.argv[1] + "/s22-kern*.csv"))
if f:
    rows = list(csv.DictReader(open(f[0])))
    tot = sum(float(r["Total Time (ns)"]) for r in rows)
    print("kernels total %.1f ms over the run" % (tot / 1e6))
    for r in rows[:25]:
        print("%5.1f%% %9.2f ms %6s x  %s" % (float(r["Time (%)"]), float(r["Total Time (ns)"]) / 1e6, r["Instances"], r["Name"][:110]))
PY
fi
pack
el done
