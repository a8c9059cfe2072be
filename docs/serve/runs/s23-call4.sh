#!/usr/bin/env bash
# Session 23 call 4: serving on one GPU — test_serve_gpu; a 300-step small-gpu checkpoint trained
# on the GPU, then `fp8moe generate --device gpu` over docs/serve/prompts.txt (greedy and sampled,
# with --stats) and the CPU's latent-cache generate of the first prompt beside it; serve_bench.
# Call: run(carry=["build-s23/bins4.tar.xz"], command="bash docs/serve/runs/s23-call4.sh", timeout_s=500)
set -uo pipefail
bin=build-s23/bin4 archive=build-s23/bins4.tar.xz name=s23_c4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|outside|worst|one prefill" "$R/serve_tests.log" | cut -c1-200 | head -30
pack
timeout 120 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 300 --batch 16 \
  --seq 256 --no-progress --out /tmp/s23-small > "$R/train.log" 2>&1
el "2. small-gpu 300 steps rc=$?"; tail -2 "$R/train.log"
cp /tmp/s23-small/metrics.jsonl "$R/train_metrics.jsonl" 2>/dev/null
timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s23-small \
  --prompts-file docs/serve/prompts.txt --max-new-tokens 48 --stats > "$R/gen_gpu_greedy.txt" 2> "$R/gen_gpu_greedy.err"
el "3. generate --device gpu greedy rc=$?"; cat "$R/gen_gpu_greedy.txt"; tail -2 "$R/gen_gpu_greedy.err"
timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s23-small \
  --prompts-file docs/serve/prompts.txt --max-new-tokens 48 --temperature 0.8 --top-p 0.9 --stats \
  > "$R/gen_gpu_sampled.txt" 2> "$R/gen_gpu_sampled.err"
el "4. generate --device gpu sampled rc=$?"; head -3 "$R/gen_gpu_sampled.txt"; tail -1 "$R/gen_gpu_sampled.err"
timeout 100 "$bin/fp8moe" generate --checkpoint /tmp/s23-small --prompt "In the beginning God created" \
  --max-new-tokens 48 > "$R/gen_cpu_greedy.txt" 2>&1
el "5. generate --device cpu (latent) greedy rc=$?"; cat "$R/gen_cpu_greedy.txt"
pack
timeout 200 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,8,32,64 --prompt 128 --new 64 \
  --date "$d" --commit "${FP8MOE_COMMIT:-s23-c4}" --out "$R/serve.jsonl" > "$R/serve_bench.log" 2>&1
el "6. serve_bench rc=$?"; cat "$R/serve_bench.log"
pack
el done
