#!/usr/bin/env python3
"""Markdown tables from combine_rows_bench's JSON lines (bench/gpu/combine_rows_bench.cu).

Usage: combine_rows_table.py FILE.jsonl [--sweep N]
Prints (1) the rows measured in every round (regs, the fastest tma variant per piece, anchors):
the median over rounds of us and GB/s, the spread (max - min over rounds), the ratio to the
fastest regs row and to the D2D copy's HBM rate of the same round; (2) with --sweep N, round 1's
N fastest tma variants and every regs row.
"""
import json
import statistics
import sys


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path, sweep = args[0], 0
    if len(args) == 3 and args[1] == "--sweep":
        sweep = int(args[2])
    elif len(args) != 1:
        print("combine_rows_table.py: bad arguments (see --help)", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in open(path) if line.strip()]
    if not rows:
        print(f"combine_rows_table.py: {path} holds no rows", file=sys.stderr)
        return 2
    r0 = rows[0]
    rounds = sorted({r["round"] for r in rows})
    print(f"{r0['gpu']}, {r0['records']} records x {r0['hidden']} BF16, top-{r0['topk']} of "
          f"{r0['experts']} ({r0['local_experts']} local), {r0['rows']} expert rows; "
          f"commit {r0['commit']}, {r0['date']}; rounds {rounds[0]}-{rounds[-1]}\n")
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    every = [v for v, rs in by_variant.items() if len(rs) == len(rounds)]
    print("| variant | us (median of rounds) | spread us | GB/s | x regs | x D2D | rel_err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v in sorted(every, key=lambda v: statistics.median(r["us"] for r in by_variant[v])):
        rs = by_variant[v]
        us = [r["us"] for r in rs]
        med = statistics.median(us)
        gbps = statistics.median(r["gbps"] for r in rs)
        xr = statistics.median(r["ratio_regs"] for r in rs)
        xd = statistics.median(r["ratio_d2d"] for r in rs)
        err = next((r["rel_err"] for r in rs if "rel_err" in r), None)
        print(f"| {v} | {med:.1f} | {max(us) - min(us):.1f} | {gbps:.0f} | "
              f"{xr:.3f} | {xd:.3f} | {'-' if err is None else f'{err:g}'} |" if xr else
              f"| {v} | {med:.1f} | {max(us) - min(us):.1f} | {gbps:.0f} | - | {xd:.3f} | - |")
    if sweep:
        first = [r for r in rows if r["round"] == rounds[0] and r["impl"] == "fp8moe"]
        tma = sorted((r for r in first if r["path"] == "tma"), key=lambda r: r["us"])[:sweep]
        regs = sorted((r for r in first if r["path"] == "regs"), key=lambda r: r["us"])
        print(f"\nRound {rounds[0]} (every variant checked against the CPU reference): regs and the "
              f"{len(tma)} fastest tma variants of {sum(r['path'] == 'tma' for r in first)}\n")
        diag = [r for r in first if r["path"] == "tma_diag"]
        print("| variant | us | GB/s | x regs | x D2D | mismatches |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in regs + tma + diag:
            print(f"| {r['variant']} | {r['us']:.1f} | {r['gbps']:.0f} | {r['ratio_regs']:.3f} | "
                  f"{r['ratio_d2d']:.3f} | {r.get('mismatches', 'not checked')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
