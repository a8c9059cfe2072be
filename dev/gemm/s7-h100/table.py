"""Prints a markdown table of gemm_bench rows: one line per (M, N, K), one column per row label
(impl for the pick and cuBLASLt, the tile for forced rows), the cell = us (runs joined by '/' when
several files hold the shape). Usage: python3 table.py [--m M] FILE.jsonl [...]"""
import json
import sys

args = sys.argv[1:]
only_m = None
if args[:1] == ["--m"]:
    only_m, args = int(args[1]), args[2:]
cells, cols, shapes = {}, [], []
for path in args:
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["kind"] != "dense" or (only_m and r["m"] != only_m):
            continue
        if r["impl"] in ("fp8moe_nosplit", "fp8moe_pick_pdl1") or "bf16" in r["impl"] or "tensor" in r["impl"]:
            continue
        label = r["tile"] if r["impl"] == "fp8moe_forced_tile" else r["impl"]
        shape = (r["m"], r["n"], r["k"])
        if shape not in shapes:
            shapes.append(shape)
        if label not in cols:
            cols.append(label)
        val = f'{r["us"]:.1f}'
        if r["impl"] == "fp8moe":
            val += f' ({r["tile"].split("/")[0]}{"/" + r["tile"].split("/")[-1] if "split" in r["tile"] else ""})'
        cells.setdefault((shape, label), []).append(val)
print("| M | N x K | " + " | ".join(cols) + " |")
print("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
for s in shapes:
    row = [" / ".join(cells.get((s, c), ["-"])) for c in cols]
    print(f"| {s[0]} | {s[1]}x{s[2]} | " + " | ".join(row) + " |")
