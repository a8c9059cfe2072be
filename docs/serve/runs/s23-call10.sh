#!/usr/bin/env bash
# Session 23 call 10: the MTP draft with its verify and draft passes as CUDA graphs (one prepare a step) — test_serve_gpu; a
# 300-step small-gpu checkpoint (its MTP module trained beside the model), then
# `fp8moe generate --device gpu` greedy over docs/serve/prompts.txt without and with --mtp-draft:
# the same text?, the drafts kept, tokens/s.
# Call: run(carry=["build-s23/bins10.tar.xz"], command="bash docs/serve/runs/s23-call10.sh", timeout_s=300)
set -uo pipefail
bin=build-s23/bin10 archive=build-s23/bins10.tar.xz name=s23_c10
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|outside|MTP draft|Expected|Which is" "$R/serve_tests.log" | cut -c1-200 | head -20
pack
timeout 120 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 300 --batch 16 \
  --seq 256 --no-progress --out /tmp/s23-small > "$R/train.log" 2>&1
el "2. small-gpu 300 steps rc=$?"; tail -1 "$R/train.log"
for n in 48 200; do
  for mode in plain draft; do
    flag=(); [[ $mode == draft ]] && flag=(--mtp-draft)
    timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s23-small \
      --prompts-file docs/serve/prompts.txt --max-new-tokens $n --ignore-eos --stats "${flag[@]}" \
      > "$R/gen_${mode}_$n.txt" 2> "$R/gen_${mode}_$n.err"
    el "3. generate $mode $n tokens rc=$?"; tail -1 "$R/gen_${mode}_$n.err"
  done
  if cmp -s "$R/gen_plain_$n.txt" "$R/gen_draft_$n.txt"; then echo "== $n tokens: same text"; else
    echo "== $n tokens: TEXT DIFFERS"; diff "$R/gen_plain_$n.txt" "$R/gen_draft_$n.txt" | head -6; fi
done
head -3 "$R/gen_draft_48.txt"
pack
el done
