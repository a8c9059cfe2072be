#!/usr/bin/env python3
"""Small-M dense rows of gemm_bench runs with forced 128x64 rows (gemm28, session 17; the layout of
mcast_table.py). Per shape, one line per fp8moe row and the cuBLASLt blockwise anchor: the time of
each run, then per run cuBLASLt's time over it (> 1: faster than cuBLASLt) and its time over the
heuristic's pick (impl fp8moe) of the same run (< 1: faster than the pick).
Usage: tile128x64_table.py A.jsonl [B.jsonl ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mcast_table import ANCHOR, key, load  # noqa: E402  (beside this file)


def main(paths):
    if not paths:
        sys.exit(__doc__)
    runs = [load(p) for p in paths]
    order = []
    for shapes in runs:
        for s in shapes:
            if s not in order:
                order.append(s)
    n = len(runs)
    head = ["row"] + [f"us run {i + 1}" for i in range(n)]
    head += [f"x cuBLASLt {i + 1}" for i in range(n)] + [f"/ pick {i + 1}" for i in range(n)]
    for m, nn, k in order:
        print(f"\n### M = {m}, N x K = {nn} x {k}\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        times = [{key(r): r["us"] for r in shapes.get((m, nn, k), [])} for shapes in runs]
        rows = []
        for t in times:
            rows += [r for r in t if r not in rows]
        for impl, tile in rows:
            label = ("forced " if impl == "fp8moe_forced_tile" else impl + " ") + tile
            cells = [label]
            cells += [f"{t[(impl, tile)]:.2f}" if (impl, tile) in t else "-" for t in times]
            for t in times:
                anchor = next((v for (i, _), v in t.items() if i == ANCHOR), None)
                mine = t.get((impl, tile))
                ok = anchor and mine and impl != ANCHOR
                cells.append(f"{anchor / mine:.3f}" if ok else "-")
            for t in times:
                pick = next((v for (i, _), v in t.items() if i == "fp8moe"), None)
                mine = t.get((impl, tile))
                cells.append(f"{mine / pick:.3f}" if pick and mine else "-")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
