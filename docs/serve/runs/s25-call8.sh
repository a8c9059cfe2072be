#!/usr/bin/env bash
# Session 25 call 8: where a prefill pass's time goes — nsys's CUDA kernel summary (if the machine
# has nsys) of serve_bench --prefill-batch 8 (small-gpu, 32 prompts of 128 tokens and of 512, two
# new tokens), one GPU.
# Call: run(kind="nvidia-h100-x1", carry=["build-s25/bins6.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call8.sh", timeout_s=300)
set -uo pipefail
bin=build-s25/bin6 archive=build-s25/bins6.tar.xz name=s25_c8
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
nsys_bin=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda-*/bin/nsys 2>/dev/null | head -1)
el "nsys: ${nsys_bin:-none}"
for p in 128 512; do
  if [[ -n $nsys_bin ]]; then
    timeout 120 "$nsys_bin" profile -o "/tmp/s25-p$p" --force-overwrite true --trace cuda \
      "$bin/serve_bench" --prefill-batch 8 --configs small-gpu --batches 32 --prompt "$p" --new 2 \
      > "$R/nsys_p$p.log" 2>&1
    el "nsys prompt $p rc=$?"; tail -4 "$R/nsys_p$p.log"
    timeout 120 "$nsys_bin" stats --report cuda_gpu_kern_sum --format csv -o "/tmp/s25-kern-p$p" \
      "/tmp/s25-p$p.nsys-rep" > /dev/null 2>&1
    cp /tmp/s25-kern-p$p*.csv "$R/" 2>/dev/null
    python3 - "$R" "$p" <<'PY'
import csv, glob, sys
f = sorted(glob.glob(f"{sys.argv[1]}/s25-kern-p{sys.argv[2]}*.csv"))
if f:
    rows = list(csv.DictReader(open(f[0])))
    tot = sum(float(r["Total Time (ns)"]) for r in rows)
    print(f"prompt {sys.argv[2]}: {len(rows)} kernels, {tot / 1e6:.1f} ms of kernel time")
    for r in rows[:16]:
        print(f'{float(r["Time (%)"]):5.1f} % {float(r["Total Time (ns)"]) / 1e6:8.2f} ms {int(r["Instances"]):7d} x {r["Name"][:110]}')
PY
  fi
  pack
done
el done
