#!/usr/bin/env python3
"""Gathered-producer A/B rows (gemm_bench --only gathered with FP8MOE_BENCH_GATHER_PRODUCERS): one
line per shape and tile of each jsonl file, the contiguous GEMM's time, the landed gathered
producer's and every variant's, each as a ratio to the contiguous row and to the landed gathered
row of the same run (rotated in one process). Usage: python3 variants_table.py A.jsonl [B.jsonl ...]"""
import json
import os
import sys

for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path) if l.strip()]
    groups, cur = [], None
    for r in rows:
        if r["kind"] == "grouped_contiguous":
            cur = {"c": r, "g": None, "v": []}
            groups.append(cur)
        elif r["kind"] == "grouped_contiguous_gathered" and cur is not None:
            if r["impl"] == "fp8moe_gathered":
                cur["g"] = r
            else:
                cur["v"].append(r)
    names = []
    for g in groups:
        for v in g["v"]:
            n = v["impl"].replace("fp8moe_gathered_", "")
            if n not in names:
                names.append(n)
    print(f"\n{os.path.basename(path)} ({groups[0]['c']['gpu']}); us, (ratio to contiguous; "
          "variants also / landed):\n")
    print("| groups x rows | N x K | tile | contiguous | landed | " + " | ".join(names) + " |")
    print("|---|---|---|---:|---:|" + "---:|" * len(names))
    for g in groups:
        c, l = g["c"], g["g"]
        by = {v["impl"].replace("fp8moe_gathered_", ""): v for v in g["v"]}
        cells = []
        for n in names:
            v = by.get(n)
            cells.append("" if v is None else
                         f'{v["us"]:.1f} ({v["us"] / c["us"]:.3f}; {v["us"] / l["us"]:.3f})')
        tile = l["tile"].replace("x128/", "/").replace("/sm132", "")
        print(f'| {c["groups"]} x {c["m"] // c["groups"]} | {c["n"]} x {c["k"]} | {tile} | '
              f'{c["us"]:.1f} | {l["us"]:.1f} ({l["us"] / c["us"]:.3f}) | ' + " | ".join(cells) + " |")
