#!/usr/bin/env bash
# Session 23 call 13: the session's last code (GeneratorGpu without the logits copy) — test_serve_gpu
# and the CLI's generate --device gpu (plain and --mtp-draft) on a 100-step small-gpu checkpoint.
# Call: run(carry=["build-s23/bins13.tar.xz", "build-bundle/lib"], command="bash docs/serve/runs/s23-call13.sh", timeout_s=300)
set -uo pipefail
bin=build-s23/bin13 archive=build-s23/bins13.tar.xz name=s23_c13
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/serve_tests.log" | head -8
timeout 100 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 100 --batch 16 \
  --seq 256 --no-progress --out /tmp/s23-c13 > "$R/train.log" 2>&1
el "2. small-gpu 100 steps rc=$?"; tail -1 "$R/train.log"
for mode in plain draft; do
  flag=(); [[ $mode == draft ]] && flag=(--mtp-draft)
  timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s23-c13 \
    --prompts-file docs/serve/prompts.txt --max-new-tokens 32 --stats "${flag[@]}" \
    > "$R/gen_$mode.txt" 2> "$R/gen_$mode.err"
  el "3. generate $mode rc=$?"; tail -1 "$R/gen_$mode.err"
done
if cmp -s "$R/gen_plain.txt" "$R/gen_draft.txt"; then echo "== same text"; else echo "== TEXT DIFFERS"; fi
head -2 "$R/gen_plain.txt"
pack
el done
