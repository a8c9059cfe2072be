#!/usr/bin/env bash
# Session 25 call 12: mla_absorb_bench from 1 token (a batch-1 decoding step) to 4096, twice (the
# tensor-core forms against the CUDA-core ones at the smallest sizes, where call 11's batch-1
# decoding read 0.87-0.95x).
# Call: run(kind="nvidia-h100-x1", carry=["build-s25/bins12.tar.xz"], command="bash docs/serve/runs/s25-call12.sh", timeout_s=120)
set -uo pipefail
bin=build-s25/bin12 archive=build-s25/bins12.tar.xz name=s25_c12
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
for i in 1 2; do
  timeout 60 "$bin/mla_absorb_bench" --out "$R/mla_absorb.jsonl" --date "$d" > "$R/mla_absorb_bench_$i.log" 2>&1
  el "mla_absorb_bench run $i rc=$?"; cat "$R/mla_absorb_bench_$i.log"
done
pack
