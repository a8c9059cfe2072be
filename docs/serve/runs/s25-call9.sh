#!/usr/bin/env bash
# Session 25 call 9: where a batched prefill pass's time goes — ncu's kernel durations (kernels
# serialised, gpu__time_duration) of `fp8moe generate --device gpu` prefilling 8 prompts of ~128
# and ~512 tokens together (--prefill-batch 8), one new token, on a 100-step small-gpu checkpoint.
# Call: run(kind="nvidia-h100-x1", carry=["build-s25/bins7.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call9.sh", timeout_s=400)
set -uo pipefail
bin=build-s25/bin7 archive=build-s25/bins7.tar.xz name=s25_c9
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json --steps 100 --batch 16 \
  --seq 256 --no-progress --out /tmp/s25-c9 > "$R/train.log" 2>&1
el "train rc=$?"
for words in 110 440; do
  python3 - "$words" > "$R/prompts_$words.txt" <<'PY'
import random, sys
random.seed(5)
vocab = "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they".split()
for i in range(8):
    print(" ".join(random.choice(vocab) for _ in range(int(sys.argv[1]))))
PY
  timeout 150 ncu --metrics gpu__time_duration.sum --csv --log-file "$R/ncu_$words.csv" \
    "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s25-c9 --prompts-file "$R/prompts_$words.txt" \
    --max-new-tokens 1 --max-batch 8 --prefill-batch 8 --prefill-chunk 8192 --stats > "$R/gen_$words.txt" 2> "$R/gen_$words.err"
  el "ncu generate ($words words a prompt) rc=$?"; grep -h '^{' "$R/gen_$words.err" | head -1
  python3 - "$R/ncu_$words.csv" <<'PY'
import csv, sys, collections, io
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = list(csv.DictReader(io.StringIO("".join(lines))))
tot = collections.Counter(); cnt = collections.Counter()
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum": continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "")
    ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
    name = r["Kernel Name"].split("(")[0].split("<")[0]
    tot[name] += ns; cnt[name] += 1
s = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {s / 1e6:.2f} ms")
for k, v in tot.most_common(14):
    print(f"{100 * v / s:5.1f} % {v / 1e6:8.3f} ms {cnt[k]:5d} x {k[:90]}")
PY
  gzip -f "$R/ncu_$words.csv"
  pack
done
el done
