#!/usr/bin/env bash
# Session 26 call 1: the low-latency EP kernels on the decoding path. MoeLayerGpu's masked form
# (MoeLayerApi.MaskedLowLatencyLayerMatchesCpuAndTheGroupedLayer: against the CPU reference of the
# masked config and bit for bit the grouped layer; graph replays), test_serve_gpu (one GPU:
# ServeGpu.LowLatencyExchangeEqualsTheNormalOne; two: GeneratorGroup.* with low_latency_ep on by
# default, LowLatencyExchangeKeepsTheText on against off), serve_bench --low-latency-ab (the same
# group on the normal kernels as the anchor, turns), test_model_gpu (the decoder's constructor and
# decode signature changed).
# Call: run(kind="nvidia-h100-x2", carry=["build-s26/bins1.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s26-call1.sh", timeout_s=600)
set -uo pipefail
bin=build-s26/bin1 archive=build-s26/bins1.tar.xz name=s26_c1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|round .* rank|low-latency|low_latency|graph replays|SKIPPED" "$1" | head -40; }
timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/test_comm_moe_layer_api.log" 2>&1
el "1. test_comm_gpu MoeLayerApi* rc=$?"; summary "$R/test_comm_moe_layer_api.log"
pack
timeout 240 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "2. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
pack
timeout 200 "$bin/serve_bench" --devices 0,1 --low-latency-ab 1 --rounds 3 --configs small-gpu,v3-slice \
  --batches 1,8,32,64 --date "$d" --out "$R/serve_ll_ab.jsonl" > "$R/bench_ll_ab.log" 2>&1
el "3. serve_bench --low-latency-ab rc=$?"; cat "$R/bench_ll_ab.log"
pack
CUDA_VISIBLE_DEVICES=0 timeout 150 "$bin/test_model_gpu" > "$R/test_model_gpu.log" 2>&1
el "4. test_model_gpu rc=$?"; summary "$R/test_model_gpu.log"
gzip -f "$R"/test_*.log
pack
el done
