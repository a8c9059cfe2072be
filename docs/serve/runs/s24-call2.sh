#!/usr/bin/env bash
# Session 24 call 2 (and 3, after mla_decode set its smem attribute per device): call 1's GeneratorGroup test hung (200 s, two ranks on one GPU, in-process:
# a rank spinning in an EP receive holds SMs a GEMM of the other rank waits for, the pattern
# comm/moe_layer_gpu.h rules out; GeneratorGroup now refuses it). test_serve_gpu with one rank a
# GPU under a watchdog (thread stacks by gdb near its limit), then the in-process serve_bench.
# Call: run(kind="nvidia-h100-x2", carry=["build-s24/bins2.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s24-call2.sh", timeout_s=400)
set -uo pipefail
bin=build-s24/bin2 archive=build-s24/bins2.tar.xz name=s24_c2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
which gdb > "$R/gdb_path.txt" 2>&1
watch_run() {  # watch_run NAME LIMIT CMD...: kill at LIMIT, stacks at LIMIT - 8
  local n=$1 limit=$2
  shift 2
  "$@" > "$R/$n.log" 2>&1 &
  local pid=$! t=0
  while kill -0 "$pid" 2>/dev/null && [[ $t -lt $limit ]]; do
    sleep 1
    t=$((t + 1))
    if [[ $t -eq $((limit - 8)) ]] && command -v gdb > /dev/null; then
      timeout 7 gdb -p "$pid" -batch -ex "thread apply all bt 25" > "$R/$n.stacks.txt" 2>&1
    fi
  done
  kill -9 "$pid" 2>/dev/null
  wait "$pid"
  local rc=$?
  el "$n rc=$rc (${t} s)"
  grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|\[ group \]|OK \]|SKIPPED" "$R/$n.log" | head -14
}
watch_run tests 120 "$bin/test_serve_gpu"
pack
watch_run bench_group 150 "$bin/serve_bench" --devices 0,1 --configs small-gpu,v3-slice --batches 1,8,32,64 \
  --out "$R/serve_group.jsonl" --date "$d"
cat "$R/bench_group.log"
pack
el done
