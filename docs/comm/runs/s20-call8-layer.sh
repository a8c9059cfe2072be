#!/usr/bin/env bash
# Session 20, call 8 (second half; the first is build-at/run.sh, the attention helper's): the MoE
# layer's forward + backward on all visible GPUs (moe_layer_bench: the host-counts form against
# ours, eager and as one CUDA graph per rank).
# Binaries: build-c8/bins.tar.xz (moe_layer_bench of main ce3cdc3+).
# Call: run(kind="nvidia-h100-x2", carry=["build-at", "build-c8/bins.tar.xz"],
#           command="bash build-at/run.sh; bash docs/comm/runs/s20-call8-layer.sh")
set -uo pipefail
bin=build-c8/bin archive=build-c8/bins.tar.xz name=s20_call8
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
unset CUDA_VISIBLE_DEVICES
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$R/machine.txt" 2>&1
timeout 240 "$bin/moe_layer_bench" --iters 8 --out "$R/moe_layer.jsonl" --date "$d" --commit s20-call8 > "$R/moe_layer_bench.log" 2>&1
el "moe_layer_bench rc=$?"; tail -14 "$R/moe_layer_bench.log"; pack
el done
