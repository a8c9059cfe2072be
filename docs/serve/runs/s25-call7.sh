#!/usr/bin/env bash
# Session 25 call 7: the session's GPU code after its last change — test_moe_gpu, test_model_gpu,
# test_serve_gpu (BatchedPrefillKeepsTheText with its MTP half), test_train_gpu on 2 GPUs; the CLI
# `fp8moe serve --prefill-batch 4` against `fp8moe generate` (one prompt a pass).
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins7.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call7.sh", timeout_s=540)
set -uo pipefail
bin=build-s25/bin7 archive=build-s25/bins7.tar.xz name=s25_c7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]|prefill passes" "$1" | head -12; }
for t in moe serve model train; do
  timeout 240 "$bin/test_${t}_gpu" > "$R/test_${t}_gpu.log" 2>&1
  el "test_${t}_gpu rc=$?"; summary "$R/test_${t}_gpu.log"
  pack
done
export CUDA_VISIBLE_DEVICES=0
timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 100 --batch 16 \
  --seq 256 --no-progress --out /tmp/s25-c7 > "$R/train.log" 2>&1
el "small-gpu 100 steps rc=$?"
python3 - docs/serve/prompts.txt > "$R/requests.jsonl" <<'PY'
import json, sys
for i, l in enumerate(l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()):
    print(json.dumps({"id": f"r{i}", "prompt": l, "max_new_tokens": 32}))
PY
timeout 60 "$bin/fp8moe" serve --checkpoint /tmp/s25-c7 --max-batch 8 --prefill-batch 4 \
  < "$R/requests.jsonl" > "$R/serve_out.jsonl" 2> "$R/serve.err"
el "fp8moe serve --prefill-batch 4 rc=$?"
timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s25-c7 --prompts-file docs/serve/prompts.txt \
  --max-new-tokens 32 --max-batch 8 > "$R/generate.txt" 2> "$R/generate.err"
el "generate rc=$?"
python3 - "$R/serve_out.jsonl" "$R/generate.txt" <<'PY'
import json, sys
res = {str(json.loads(l)["id"]): json.loads(l) for l in open(sys.argv[1])}
gen = [l.rstrip("\n") for l in open(sys.argv[2])]
same = sum(1 for i, g in enumerate(gen) if f"r{i}" in res and res[f"r{i}"].get("completion") and g.endswith(res[f"r{i}"]["completion"]))
print(f"== serve --prefill-batch 4 vs generate: {same} of {len(gen)} completions end the generate line")
PY
pack
el done
