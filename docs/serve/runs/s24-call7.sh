#!/usr/bin/env bash
# Session 24 call 7: requests arriving while others run — GeneratorGpu::serve (test_serve_gpu,
# ServeEqualsGenerate and the rest), the CLI `fp8moe serve` on JSON lines (completions against
# `fp8moe generate`'s lines for the same prompts; bad lines answered with errors), and
# serve_bench --arrival-rates (open-loop Poisson load on one GPU).
# Call: run(carry=["build-s24/bins7.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s24-call7.sh", timeout_s=300)
set -uo pipefail
bin=build-s24/bin7 archive=build-s24/bins7.tar.xz name=s24_c7
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
export CUDA_VISIBLE_DEVICES=0
timeout 150 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"
grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|serve\(\)" "$R/serve_tests.log" | head -12
pack
timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 100 --batch 16 \
  --seq 256 --no-progress --out /tmp/s24-c7 > "$R/train.log" 2>&1
el "2. small-gpu 100 steps rc=$?"
python3 - docs/serve/prompts.txt > "$R/requests.jsonl" <<'PY'
import json, sys
lines = [l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()]
for i, l in enumerate(lines):
    print(json.dumps({"id": f"r{i}", "prompt": l, "max_new_tokens": 32}))
    if i == 2:
        print('{"id": "bad-key", "prompt": "x", "temprature": 1}')
        print('{"id": "bad-json", "prompt": ')
        print(json.dumps({"id": "sampled", "prompt": l, "max_new_tokens": 16, "temperature": 0.8, "top_p": 0.9, "seed": 3}))
PY
timeout 60 "$bin/fp8moe" serve --checkpoint /tmp/s24-c7 --max-batch 4 < "$R/requests.jsonl" \
  > "$R/serve_out.jsonl" 2> "$R/serve.err"
el "3. fp8moe serve rc=$?"; cat "$R/serve_out.jsonl" | head -14
timeout 60 "$bin/fp8moe" serve --checkpoint /tmp/s24-c7 --max-batch 4 --stream < "$R/requests.jsonl" \
  > "$R/serve_stream.jsonl" 2>> "$R/serve.err"
el "3b. fp8moe serve --stream rc=$? ($(grep -c delta "$R/serve_stream.jsonl") delta lines)"
timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s24-c7 --prompts-file docs/serve/prompts.txt \
  --max-new-tokens 32 > "$R/generate.txt" 2> "$R/generate.err"
el "4. generate rc=$?"
python3 - "$R/serve_out.jsonl" "$R/generate.txt" "$R/serve_stream.jsonl" <<'PY'
import json, sys
res = {}
for l in open(sys.argv[1]):
    j = json.loads(l)
    res[str(j["id"])] = j
gen = [l.rstrip("\n") for l in open(sys.argv[2])]
same = sum(1 for i, g in enumerate(gen) if f"r{i}" in res and g.endswith(res[f"r{i}"]["completion"]) and res[f"r{i}"]["completion"])
errors = [k for k, v in res.items() if "error" in v]
print(f"== serve vs generate: {same} of {len(gen)} completions are the generate line's end; errors: {errors}")
deltas = {}
finals = {}
for l in open(sys.argv[3]):
    j = json.loads(l)
    if "delta" in j: deltas[str(j["id"])] = deltas.get(str(j["id"]), "") + j["delta"]
    elif "completion" in j: finals[str(j["id"])] = j["completion"]
print(f"== stream: {sum(1 for k in finals if deltas.get(k) == finals[k])} of {len(finals)} requests' deltas add up to the completion")
PY
pack
timeout 100 "$bin/serve_bench" --arrival-rates 100,200,400,800 --configs small-gpu --batches 64 \
  --requests 256 --out "$R/serve_arrivals.jsonl" --date "$d" > "$R/bench.log" 2>&1
el "5. serve_bench --arrival-rates rc=$?"; cat "$R/bench.log"
pack
el done
