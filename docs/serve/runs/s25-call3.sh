#!/usr/bin/env bash
# Session 25 call 3: redundant experts end to end — the CLI pipeline (a checkpoint's load under
# `fp8moe launch -n 2 ... generate --expert-load-out`, `fp8moe eplb`, then `generate
# --expert-placement` on the plan; a plan that does not fit refused), and serve_bench --eplb:
# the two-GPU group over EPLB's plan of its own load against the plain group, random weights with
# hot experts (--skew), prefill-heavy and decoding-heavy queues.
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins3.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call3.sh", timeout_s=480)
set -uo pipefail
bin=build-s25/bin3 archive=build-s25/bins3.tar.xz name=s25_c3
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 150 --batch 16 --seq 256 --no-progress --out /tmp/s25-c3 > "$R/train.log" 2>&1
el "1. small-gpu 150 steps rc=$?"; tail -1 "$R/train.log"
gen() {  # gen NAME ARGS... (two ranks)
  local n=$1
  shift
  timeout 90 "$bin/fp8moe" launch -n 2 --no-prefix -- "$bin/fp8moe" generate --device gpu \
    --checkpoint /tmp/s25-c3 --prompts-file docs/serve/prompts.txt --max-new-tokens 48 --stats "$@" \
    > "$R/gen_$n.txt" 2> "$R/gen_$n.err"
  local rc=$?
  el "2. generate $n rc=$rc"; grep -h '^{' "$R/gen_$n.err" | head -2
}
gen plain --expert-load-out "$R/load.json" --redundant-experts 4
timeout 30 "$bin/fp8moe" eplb --input "$R/load.json" --output "$R/plan.json"
el "3. fp8moe eplb rc=$?"
python3 - "$R/load.json" "$R/plan.json" <<'PY'
import json, sys
load, plan = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
for l, (w, p) in enumerate(zip(load["weight"], plan["phy2log"])):
    half = len(p) // 2
    def gpu(slots):
        return sum(w[e] / plan["logcnt"][l][e] for e in slots)
    plain = [sum(w[: len(w) // 2]), sum(w[len(w) // 2 :])]
    planned = [gpu(p[:half]), gpu(p[half:])]
    print(f"layer {l}: {int(sum(w))} routed, GPU loads plain {plain[0]:.0f}/{plain[1]:.0f} "
          f"(max/mean {max(plain) / (sum(plain) / 2):.3f}), planned {planned[0]:.0f}/{planned[1]:.0f} "
          f"(max/mean {max(planned) / (sum(planned) / 2):.3f}); replicated: "
          f"{[e for e, c in enumerate(plan['logcnt'][l]) if c > 1]}")
PY
gen placed --expert-placement "$R/plan.json"
echo "== plain vs placed: $(paste "$R/gen_plain.txt" "$R/gen_placed.txt" | awk -F'\t' '$1==$2{s++} END{print s+0 " of " NR " lines equal"}')"
python3 -c "import json,sys; p=json.load(open(sys.argv[1])); p['phy2log']=p['phy2log'][1:]; json.dump(p,open(sys.argv[2],'w'))" \
  "$R/plan.json" "$R/plan_short.json"
gen short --expert-placement "$R/plan_short.json"
grep -h "expert placement" "$R/gen_short.err" | head -2
pack
b() {  # b NAME ARGS...
  local n=$1
  shift
  timeout 150 "$bin/serve_bench" --devices 0,1 --out "$R/serve_eplb.jsonl" --date "$d" "$@" > "$R/bench_$n.log" 2>&1
  el "4. serve_bench $n rc=$?"; cat "$R/bench_$n.log"
  pack
}
b prefill_s0 --configs v3-slice --eplb 4 --skew 0 --batches 8,32 --prompt 512 --new 8
b prefill_s02 --configs v3-slice --eplb 4 --skew 0.2 --batches 8,32 --prompt 512 --new 8
b prefill_s05 --configs v3-slice --eplb 8 --skew 0.5 --batches 8,32 --prompt 512 --new 8
b decode_s02 --configs v3-slice,small-gpu --eplb 4 --skew 0.2 --batches 8,64 --prompt 128 --new 64
el done
