#!/usr/bin/env bash
# Session 25 call 1: what session 24 changed after its last GPU run — test_serve_gpu on 2 GPUs
# (ServeEqualsGenerate's fixed source, the serve test helpers' fold, peer_access.h), the CLI
# `fp8moe serve` against `fp8moe generate` (CompletionText shared with the CPU path), and a
# serve_bench smoke (its config / random-weights fold).
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins1.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call1.sh", timeout_s=300)
set -uo pipefail
bin=build-s25/bin1 archive=build-s25/bins1.tar.xz name=s25_c1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 200 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]" "$R/serve_tests.log" | head -12
pack
export CUDA_VISIBLE_DEVICES=0
timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 100 --batch 16 \
  --seq 256 --no-progress --out /tmp/s25-c1 > "$R/train.log" 2>&1
el "2. small-gpu 100 steps rc=$?"
python3 - docs/serve/prompts.txt > "$R/requests.jsonl" <<'PY'
import json, sys
lines = [l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()]
for i, l in enumerate(lines):
    print(json.dumps({"id": f"r{i}", "prompt": l, "max_new_tokens": 32}))
    if i == 2:
        print('{"id": "bad-key", "prompt": "x", "temprature": 1}')
PY
timeout 60 "$bin/fp8moe" serve --checkpoint /tmp/s25-c1 --max-batch 4 < "$R/requests.jsonl" \
  > "$R/serve_out.jsonl" 2> "$R/serve.err"
el "3. fp8moe serve rc=$?"
timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s25-c1 --prompts-file docs/serve/prompts.txt \
  --max-new-tokens 32 > "$R/generate.txt" 2> "$R/generate.err"
el "4. generate rc=$?"
python3 - "$R/serve_out.jsonl" "$R/generate.txt" <<'PY'
import json, sys
res = {str(json.loads(l)["id"]): json.loads(l) for l in open(sys.argv[1])}
gen = [l.rstrip("\n") for l in open(sys.argv[2])]
same = sum(1 for i, g in enumerate(gen) if f"r{i}" in res and res[f"r{i}"].get("completion") and g.endswith(res[f"r{i}"]["completion"]))
print(f"== serve vs generate: {same} of {len(gen)} completions end the generate line; errors: {[k for k, v in res.items() if 'error' in v]}")
PY
pack
timeout 60 "$bin/serve_bench" --configs small-gpu --batches 1,16 --out "$R/serve_bench.jsonl" --date "$d" > "$R/bench.log" 2>&1
el "5. serve_bench smoke rc=$?"; tail -8 "$R/bench.log"
pack
el done
