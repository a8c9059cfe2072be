#!/usr/bin/env bash
# Session 24 call 4: sampling on the device in GeneratorGpu (kernels/sampling.h; default on):
# test_serve_gpu (greedy device == host, sampled batch-invariant both ways, the MTP draft's check
# on the device; the two-GPU group), serve_bench with device vs host sampling at the configs'
# vocabulary and at V3's (129280), the CLI's MTP draft sampled on the device vs the host on a
# 200-step checkpoint, the two-GPU group at V3's vocabulary.
# Call: run(kind="nvidia-h100-x2", carry=["build-s24/bins4.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s24-call4.sh", timeout_s=480)
set -uo pipefail
bin=build-s24/bin4 archive=build-s24/bins4.tar.xz name=s24_c4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|\[ group \]|MTP draft" "$1" | head -16; }
timeout 150 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"; summary "$R/serve_tests.log"
pack
CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,8,64 \
  --out "$R/serve.jsonl" --date "$d" > "$R/bench.log" 2>&1
el "2. serve_bench rc=$?"; cat "$R/bench.log"
pack
CUDA_VISIBLE_DEVICES=0 timeout 150 "$bin/serve_bench" --configs small-gpu --vocab 129280 --batches 1,8,64 \
  --out "$R/serve_v3vocab.jsonl" --date "$d" > "$R/bench_v3vocab.log" 2>&1
el "3. serve_bench --vocab 129280 rc=$?"; cat "$R/bench_v3vocab.log"
pack
CUDA_VISIBLE_DEVICES=0 timeout 100 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 200 --batch 16 --seq 256 --no-progress --out /tmp/s24-c4 > "$R/train.log" 2>&1
el "4. small-gpu 200 steps rc=$?"; tail -1 "$R/train.log"
for mode in plain draft plain_host draft_host; do
  flag=(--temperature 0.8 --top-p 0.9 --seed 5)
  [[ $mode == draft* ]] && flag+=(--mtp-draft)
  [[ $mode == *host ]] && flag+=(--host-sampling)
  CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s24-c4 \
    --prompts-file docs/serve/prompts.txt --max-new-tokens 64 --stats "${flag[@]}" \
    > "$R/gen_$mode.txt" 2> "$R/gen_$mode.err"
  el "5. generate sampled $mode rc=$?"; tail -1 "$R/gen_$mode.err"
done
head -2 "$R/gen_draft.txt"
pack
timeout 100 "$bin/serve_bench" --devices 0,1 --configs small-gpu --vocab 129280 --batches 1,8,64 \
  --out "$R/serve_group_v3vocab.jsonl" --date "$d" > "$R/bench_group.log" 2>&1
el "6. serve_bench --devices 0,1 --vocab 129280 rc=$?"; cat "$R/bench_group.log"
pack
el done
