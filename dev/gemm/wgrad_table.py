#!/usr/bin/env python3
"""Markdown table of gemm_bench's weight-gradient rows: one column per (file, impl/tile) run.

usage: wgrad_table.py LABEL=FILE.jsonl [LABEL=FILE.jsonl ...]
Each cell is the median time in us and TFLOPS; the anchor row is cuBLASLt's (same file)."""
import json
import sys


def main():
    runs = []
    for arg in sys.argv[1:]:
        label, path = arg.split("=", 1)
        rows = [json.loads(line) for line in open(path) if line.strip()]
        runs.append((label, [r for r in rows if r.get("kind") in ("wgrad", "kgrouped_wgrad")]))
    shapes = []
    for _, rows in runs:
        for r in rows:
            key = (r["kind"], r["m"], r["n"], r["k"], r["groups"])
            if key not in shapes:
                shapes.append(key)
    print("| run | row | " + " | ".join(f"{k} {m}x{n}x{kk} g{g}" for k, m, n, kk, g in shapes) + " |")
    print("| --- | --- |" + " --- |" * len(shapes))
    for label, rows in runs:
        names = []
        for r in rows:
            name = r["impl"] + (" " + r["tile"] if r.get("tile") and r["impl"] != "fp8moe" else "")
            if name not in names:
                names.append(name)
        for name in names:
            cells = []
            for key in shapes:
                hit = [r for r in rows
                       if (r["kind"], r["m"], r["n"], r["k"], r["groups"]) == key and
                       r["impl"] + (" " + r["tile"] if r.get("tile") and r["impl"] != "fp8moe"
                                    else "") == name]
                cells.append(f"{hit[0]['us']:.1f} us ({hit[0]['tflops']:.0f})" if hit else "")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
