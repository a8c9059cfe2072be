#!/usr/bin/env bash
# Session 23 call 6: where a batch-1 decoding step's ~1 ms goes — ncu's per-kernel summary of
# serve_bench (small-gpu, batch 1, 4 new tokens), graphs on (kernel nodes profiled one by one).
# Call: run(carry=["build-s23/bins5.tar.xz"], command="bash docs/serve/runs/s23-call6.sh", timeout_s=400)
set -uo pipefail
bin=build-s23/bin5 archive=build-s23/bins5.tar.xz name=s23_c6
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: ${ncu_bin:-none}"
timeout 300 "$ncu_bin" --metrics gpu__time_duration.sum --print-summary per-kernel \
  "$bin/serve_bench" --configs small-gpu --batches 1 --prompt 16 --new 4 > "$R/ncu_small_b1.txt" 2>&1
el "1. ncu serve_bench small-gpu b1 rc=$?"
python3 - "$R/ncu_small_b1.txt" <<'PY' | tee "$R/ncu_small_b1_table.txt"
import re, sys
text = open(sys.argv[1]).read()
rows = []
for block in re.split(r"\n(?=  \S)", text):
    m = re.match(r"\s*(\S.*?)\s+\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", block)
    if not m: continue
    name = m.group(1)[:90]
    inv = re.search(r"Invocations\s+(\d+)", block) or re.search(r"(\d+) invocations", block)
    t = re.search(r"gpu__time_duration.sum\s+\S+\s+([\d.,]+)\s+([\d.,]+)\s+([\d.,]+)", block)
    if t:
        rows.append((name, int(inv.group(1)) if inv else 0, float(t.group(2).replace(",", ""))))
tot = sum(n * a for _, n, a in rows)
for name, n, avg in sorted(rows, key=lambda r: -r[1] * r[2])[:40]:
    print(f"{n*avg/1e3:10.1f} us total {n:6d} x {avg/1e3:8.2f} us  {name}")
print(f"sum {tot/1e3:.1f} us over {sum(n for _, n, _ in rows)} launches")
PY
pack
el done
