#!/usr/bin/env bash
# Session 23 call 15: call 14 again after token_probs sorts only the nucleus head (a partial sort growing from 64) — test_serve_gpu
# (greedy text unchanged, sampled text batch-invariant), then the CLI on a 300-step small-gpu
# checkpoint: greedy plain vs --mtp-draft (same text), sampled (temperature 0.8, top-p 0.9) with and
# without the draft (drafts kept, tokens/s).
# Call: run(carry=["build-s23/bins15.tar.xz", "build-bundle/lib"], command="bash docs/serve/runs/s23-call15.sh", timeout_s=300)
set -uo pipefail
bin=build-s23/bin15 archive=build-s23/bins15.tar.xz name=s23_c15
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|MTP draft" "$R/serve_tests.log" | head -8
timeout 100 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 300 --batch 16 \
  --seq 256 --no-progress --out /tmp/s23-c15 > "$R/train.log" 2>&1
el "2. small-gpu 300 steps rc=$?"; tail -1 "$R/train.log"
gen() {  # gen NAME ARGS...
  local n=$1
  shift
  timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s23-c15 \
    --prompts-file docs/serve/prompts.txt --max-new-tokens 200 --ignore-eos --stats "$@" \
    > "$R/gen_$n.txt" 2> "$R/gen_$n.err"
  el "3. generate $n rc=$?"; tail -1 "$R/gen_$n.err"
}
gen greedy_plain
gen greedy_draft --mtp-draft
if cmp -s "$R/gen_greedy_plain.txt" "$R/gen_greedy_draft.txt"; then echo "== greedy: same text"; else echo "== greedy: TEXT DIFFERS"; fi
gen sampled_plain --temperature 0.8 --top-p 0.9
gen sampled_draft --temperature 0.8 --top-p 0.9 --mtp-draft
head -2 "$R/gen_sampled_draft.txt"
pack
el done
