#!/usr/bin/env bash
# Session 27 call 4 (one GPU): the low-latency EP kernels for one GPU's decoding too
# (GeneratorOptions::low_latency_ep no longer ignored at world 1: the MoE layers' one-rank EP
# group's decoding passes over the masked low-latency form). test_serve_gpu (every one-GPU test
# now decodes through it by default; texts checked as before), moe_decode_bench --ranks 1 (one
# layer's decoding step, normal vs LL, one rank), serve_bench --devices 0 --low-latency-ab 1.
# Call: run(kind="nvidia-h100-x1", carry=["build-s27/bins4.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s27-call4.sh", timeout_s=600)
set -uo pipefail
bin=build-s27/bin4 archive=build-s27/bins4.tar.xz name=s27_c4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
export CUDA_VISIBLE_DEVICES=0
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \]" "$1" | head -20; }
timeout 100 "$bin/moe_decode_bench" --ranks 1 --shapes small-gpu,v3-slice,v3 --tokens 1,8,32,64,128 \
  --iters 5 --date "$d" --out "$R/moe_decode_1rank.jsonl" > "$R/bench_moe_decode_1rank.log" 2>&1
el "1. moe_decode_bench --ranks 1 rc=$?"; grep -E "^(shape|small|v3)" "$R/bench_moe_decode_1rank.log" | head -18
pack
timeout 150 "$bin/serve_bench" --devices 0 --low-latency-ab 1 --rounds 2 --configs small-gpu,v3-slice \
  --batches 1,8,32,64 --date "$d" --out "$R/serve_ll_ab_1gpu.jsonl" > "$R/bench_serve_ll_ab_1gpu.log" 2>&1
el "2. serve_bench --devices 0 --low-latency-ab rc=$?"; grep -E "^(config|small|v3)" "$R/bench_serve_ll_ab_1gpu.log" | head -12
pack
timeout 200 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "3. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
gzip -f "$R"/test_*.log
pack
el done
