#!/usr/bin/env python3
"""Small-M dense rows of gemm_bench runs (JSON lines, same shapes) with GemmTileConfig::b_fetch
rows (tile descriptions ending /bf128 or /bf512, gemm25): per shape one line per row, its time in
each run, cuBLASLt blockwise time / ours of the same run (> 1: ours faster), and for a /bfN row
its time over the same forced tile without /bfN in the same run (< 1: the fetch size helps).
Usage: bfetch_table.py A.jsonl [B.jsonl ...]"""
import json
import re
import sys
from collections import OrderedDict

runs = []
for path in sys.argv[1:]:
    shapes = OrderedDict()
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            if r.get("kind") == "dense":
                shapes.setdefault((r["m"], r["n"], r["k"]), []).append(r)
    runs.append(shapes)
if not runs:
    sys.exit("usage: bfetch_table.py A.jsonl [B.jsonl ...]")


def label(r):
    return ("forced " if r["impl"] == "fp8moe_forced_tile" else r["impl"] + " ") + r.get("tile", "")


BF = re.compile(r"/bf(\d+)$")
n = len(runs)
print("| M | N | K | row | " + " | ".join(f"us run {i + 1}" for i in range(n)) + " | " +
      " | ".join(f"x cuBLASLt run {i + 1}" for i in range(n)) + " | / same tile without bf (each run) |")
print("|" + " --- |" * (5 + 2 * n))
for key in runs[0]:
    per_run = []
    for shapes in runs:
        rows = {label(r): r for r in shapes.get(key, [])}
        lt = next((r for r in rows.values() if r["impl"] == "cublaslt_fp8_blockwise"), None)
        per_run.append((rows, lt))
    for name in per_run[0][0]:
        us = [rows[name]["us"] if name in rows else None for rows, _ in per_run]
        xs = [lt["us"] / rows[name]["us"] if lt and name in rows else None for rows, lt in per_run]
        base = BF.sub("", name) if BF.search(name) else None
        rel = []
        for rows, _ in per_run:
            if base and base in rows and name in rows:
                rel.append(f"{rows[name]['us'] / rows[base]['us']:.3f}")
            else:
                rel.append("-")
        f = lambda v, s: s.format(v) if v is not None else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {name} | " +
              " | ".join(f(v, "{:.2f}") for v in us) + " | " +
              " | ".join(f(v, "{:.3f}") for v in xs) + " | " + " / ".join(rel) + " |")
