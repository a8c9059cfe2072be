#!/usr/bin/env bash
# Session 26 call 7: one masked endpoint and MoeLayerGpu for all the MoE layers of a model
# (MoeLayerGpu::set_weights; ModelGpu::reserve_low_latency_ep shares them; DecoderLayerGpu::
# use_low_latency_moe) instead of one a layer. MoeLayerApi* (set_weights' checks), test_serve_gpu
# (one GPU: logits bit for bit through the shared layer over 3 MoE layers; two GPUs: texts equal
# with the option on and off), test_model_gpu, serve_bench --low-latency-ab (against calls 4/5),
# the CLI over `fp8moe launch -n 2` (endpoints through CUDA IPC, block ids after the layers').
# Call: run(kind="nvidia-h100-x2", carry=["build-s26/bins7.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s26-call7.sh", timeout_s=300)
set -uo pipefail
bin=build-s26/bin7 archive=build-s26/bins7.tar.xz name=s26_c7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|low-latency|low_latency" "$1" | head -20; }
CUDA_VISIBLE_DEVICES=1 timeout 100 "$bin/test_model_gpu" > "$R/test_model_gpu.log" 2>&1 &
timeout 100 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/test_comm_moe_layer_api.log" 2>&1
el "1. test_comm_gpu MoeLayerApi* rc=$?"; summary "$R/test_comm_moe_layer_api.log"
wait
el "2. test_model_gpu"; summary "$R/test_model_gpu.log"
timeout 120 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "3. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
pack
timeout 100 "$bin/serve_bench" --devices 0,1 --low-latency-ab 1 --rounds 3 --configs small-gpu,v3-slice \
  --batches 1,64 --date "$d" --out "$R/serve_ll_ab.jsonl" > "$R/bench_ll_ab.log" 2>&1
el "4. serve_bench --low-latency-ab rc=$?"; cat "$R/bench_ll_ab.log"
pack
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 100 --batch 16 --seq 256 --no-progress --out /tmp/s26-c7 > "$R/train.log" 2>&1
el "5. small-gpu 100 steps rc=$?"
for n in low_latency normal; do
  extra=(); [[ $n == normal ]] && extra=(--normal-ep-decoding)
  timeout 90 "$bin/fp8moe" launch -n 2 --no-prefix -- "$bin/fp8moe" generate --device gpu \
    --checkpoint /tmp/s26-c7 --prompts-file docs/serve/prompts.txt --max-new-tokens 32 --stats "${extra[@]}" \
    > "$R/gen_$n.txt" 2> "$R/gen_$n.err"
  el "6. generate $n rc=$?"
done
echo "== low-latency vs normal: $(paste "$R/gen_low_latency.txt" "$R/gen_normal.txt" | awk -F'\t' '$1==$2{s++} END{print s+0 " of " NR " lines equal"}')"
grep -ho '"low_latency_passes":[0-9]*' "$R"/gen_*.err
gzip -f "$R"/test_*.log
pack
el done
