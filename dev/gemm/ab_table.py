"""Prints the A/B table of dev/gemm/ab_run.sh: per M=4096 dense row, the current kernel's and the
baseline's times in each round and the speed-up of current over baseline, raw and normalised by
the same binary's cuBLASLt blockwise time (which cancels clock drift between the runs).
Usage: python3 dev/gemm/ab_table.py DIR (holding ab_{new,base}_{1,2}.jsonl)."""
import json
import sys
from pathlib import Path

d = Path(sys.argv[1])


def load(name):
    rows = {}
    p = d / name
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "dense" or r["m"] != 4096:
            continue
        key = (r["impl"], r["n"], r["k"], r.get("tile", "") if r["impl"] == "fp8moe_forced_tile" else "")
        rows[key] = r
    return rows


runs = {(v, i): load(f"ab_{v}_{i}.jsonl") for v in ("new", "base") for i in (1, 2)}
print(f"{'row':<44} {'new1':>7} {'base1':>7} {'new2':>7} {'base2':>7} {'raw':>6} {'norm':>6}")
for key in runs[("new", 1)]:
    if key[0] not in ("fp8moe", "fp8moe_forced_tile"):
        continue
    us = {}
    ok = True
    for vi, rows in runs.items():
        r = rows.get(key)
        blk = rows.get(("cublaslt_fp8_blockwise", key[1], key[2], ""))
        if r is None or blk is None:
            ok = False
            break
        us[vi] = (r["us"], blk["us"])
    if not ok:
        continue
    raw = (us[("base", 1)][0] + us[("base", 2)][0]) / (us[("new", 1)][0] + us[("new", 2)][0])
    norm = sum(us[("base", i)][0] / us[("base", i)][1] for i in (1, 2)) / sum(
        us[("new", i)][0] / us[("new", i)][1] for i in (1, 2))
    name = f"{key[0]} {key[1]}x{key[2]} {key[3]}"
    print(f"{name:<44} {us[('new', 1)][0]:7.1f} {us[('base', 1)][0]:7.1f} {us[('new', 2)][0]:7.1f} "
          f"{us[('base', 2)][0]:7.1f} {raw:6.3f} {norm:6.3f}")
