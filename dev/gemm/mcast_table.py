#!/usr/bin/env python3
"""Small-M dense rows of gemm_bench runs with GemmTileConfig::cluster_n rows (tile descriptions
ending /mca2 or /mca4, gemm26, session 16). Per shape, one line per fp8moe row and the cuBLASLt
blockwise anchor: the time of each run, then per run cuBLASLt's time over ours (> 1: ours
faster) and, for an /mcaN row, its time over the same forced tile without /mcaN in the same run
(< 1: the A multicast helps).
Usage: mcast_table.py A.jsonl [B.jsonl ...]"""
import json
import re
import sys

MCA = re.compile(r"/mca(\d+)$")
ANCHOR = "cublaslt_fp8_blockwise"


def load(path):
    shapes = {}
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r.get("kind") != "dense":
            continue
        shapes.setdefault((r["m"], r["n"], r["k"]), []).append(r)
    return shapes


def key(r):
    return (r["impl"], r.get("tile") or "")


def main(paths, variant=MCA, plain=lambda m: ""):
    """variant: the regex that marks a variant's tile description; plain: what its match is
    replaced by to name the same tile without the variant (csplit_table.py passes its own)."""
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
    head += [f"x cuBLASLt {i + 1}" for i in range(n)] + [f"/ plain {i + 1}" for i in range(n)]
    for m, nn, k in order:
        print(f"\n### M = {m}, N x K = {nn} x {k}\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        times = []  # per run: {(impl, tile): us}
        for shapes in runs:
            times.append({key(r): r["us"] for r in shapes.get((m, nn, k), [])})
        rows = []
        for t in times:
            for r in t:
                if r not in rows:
                    rows.append(r)
        for impl, tile in rows:
            label = (
                "forced " if impl == "fp8moe_forced_tile" else impl + " "
            ) + tile
            cells = [label]
            cells += [f"{t[(impl, tile)]:.2f}" if (impl, tile) in t else "-" for t in times]
            for t in times:
                anchor = next((v for (i, _), v in t.items() if i == ANCHOR), None)
                mine = t.get((impl, tile))
                ok = anchor and mine and impl != ANCHOR
                cells.append(f"{anchor / mine:.3f}" if ok else "-")
            mm = variant.search(tile)
            for t in times:
                base = t.get((impl, variant.sub(plain, tile))) if mm else None
                mine = t.get((impl, tile))
                cells.append(f"{mine / base:.3f}" if base and mine else "-")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
