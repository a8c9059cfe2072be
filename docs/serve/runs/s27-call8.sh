#!/usr/bin/env bash
# Session 27 call 8 (one H100): the shared expert's padding rows at T <= 64 (forward-only layers)
# on H100, where session 27's ncu saw the shared GEMMs pull from 64 / 56 SMs; the final's A/B ran
# on 2 x H200 (no change at V3 widths there). moe_decode_bench one rank, old (main e3b90c1) and
# new alternated, twice each.
# Call: run(kind="nvidia-h100-x1", carry=["build-s27/binsC.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s27-call8.sh", timeout_s=200)
set -uo pipefail
bin=build-s27/binC archive=build-s27/binsC.tar.xz name=s27_c8
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
for v in moe_decode_bench_old moe_decode_bench moe_decode_bench_old moe_decode_bench; do
  CUDA_VISIBLE_DEVICES=0 timeout 40 "$bin/$v" --ranks 1 --shapes small-gpu,v3-slice,v3 --tokens 1,8,64 \
    --iters 5 --date "$d" --out "$R/$v.jsonl" > "$R/bench_$v.log" 2>&1
  el "$v rc=$?"; grep -E "^(small|v3)" "$R/bench_$v.log" | awk '{print $1, $3, $5}' | tr '\n' ';'; echo
done
pack
el done
