#!/usr/bin/env bash
# Session 25 call 5 (4 GPUs): eplb_moe_bench — one MoE layer's forward at V3's prefill shape with
# Zipf-skewed routing, plain placement against EPLB's 32 redundant slots, on 4 ranks and on 2
# (GPUs 0-1 of the same machine); moe_layer_bench on 2 ranks after its weights moved to
# random_expert_weights.cuh (the same numbers as session 20's, its check bit for bit).
# Call: run(kind="nvidia-h100-x4", carry=["build-s25/bins5.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call5.sh", timeout_s=420)
set -uo pipefail
bin=build-s25/bin5 archive=build-s25/bins5.tar.xz name=s25_c5
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
run_eplb() {  # run_eplb GPUS ZIPF
  CUDA_VISIBLE_DEVICES=$1 timeout 120 "$bin/eplb_moe_bench" --zipf "$2" --redundant 32 --iters 10 \
    --out "$R/eplb_moe.jsonl" --date "$d" > "$R/eplb_$1_$2.log" 2>&1
  el "eplb_moe_bench GPUs $1 zipf $2 rc=$?"; cat "$R/eplb_$1_$2.log"
  pack
}
for z in 0 0.5 1.0 1.5; do run_eplb 0,1,2,3 "$z"; done
for z in 0 1.0; do run_eplb 0,1 "$z"; done
CUDA_VISIBLE_DEVICES=0,1 timeout 120 "$bin/moe_layer_bench" --iters 5 --out "$R/moe_layer.jsonl" \
  --date "$d" > "$R/moe_layer.log" 2>&1
el "moe_layer_bench rc=$?"; cat "$R/moe_layer.log"
pack
el done
