#!/usr/bin/env python3
"""Small-M dense rows of several gemm_bench runs (JSON lines, same shapes): per shape one line per
row (the pick, the pick without a workspace, the forced rows), its time in each run, the ratio
cuBLASLt blockwise time / ours of each run (> 1: ours faster; cuBLASLt of the same run), and its
time against the pick's old configuration (`--old "M,N,K=TEXT"`: the forced row whose tile contains TEXT; default the
no-workspace row). Usage: streamk_table.py [--old 128,7168,16384=DESC ...] A.jsonl [B.jsonl ...]"""
import json
import sys
from collections import OrderedDict

args, old = [], {}
it = iter(sys.argv[1:])
for a in it:
    if a == "--old":
        key, desc = next(it).split("=", 1)
        old[tuple(int(x) for x in key.split(","))] = desc
    else:
        args.append(a)
runs = []
for path in args:
    shapes = OrderedDict()
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("kind") != "dense":
            continue
        shapes.setdefault((r["m"], r["n"], r["k"]), []).append(r)
    runs.append(shapes)


def label(r):
    if r["impl"] == "fp8moe_forced_tile":
        return "forced " + r["tile"]
    return r["impl"] + " " + r.get("tile", "")


print("| M | N | K | row | " + " | ".join(f"us run {i + 1}" for i in range(len(runs))) + " | " +
      " | ".join(f"x cuBLASLt run {i + 1}" for i in range(len(runs))) + " | / old (each run) |")
print("|" + " --- |" * (5 + 2 * len(runs)))
for key in runs[0]:
    m, n, k = key
    per_run = []
    for shapes in runs:
        rows = shapes.get(key, [])
        lt = next((r for r in rows if r["impl"] == "cublaslt_fp8_blockwise"), None)
        per_run.append(({label(r): r for r in rows}, lt))
    want_old = old.get(key)
    for name in per_run[0][0]:
        us = [p[0].get(name, {}).get("us") for p in per_run]
        xs = [(p[1]["us"] / p[0][name]["us"]) if p[1] and name in p[0] else None for p in per_run]
        rel = []
        for p in per_run:
            o = None
            for lab, r in p[0].items():
                if (want_old and want_old in r.get("tile", "") and lab.startswith("forced")) or (
                        not want_old and r["impl"] == "fp8moe_nosplit"):
                    o = r
            rel.append(f"{p[0][name]['us'] / o['us']:.3f}" if o and name in p[0] else "-")
        fmt = lambda v, f: f.format(v) if v is not None else "-"
        print(f"| {m} | {n} | {k} | {name} | " + " | ".join(fmt(u, "{:.2f}") for u in us) + " | " +
              " | ".join(fmt(x, "{:.3f}") for x in xs) + " | " + " / ".join(rel) + " |")
