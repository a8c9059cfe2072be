#!/usr/bin/env python3
"""Markdown table of moe_forward_bench rows (bench "moe_forward"): per op, the medians over all
rounds of each path, the ratio gathered / expanded of those medians, and the median and range of
the per-round ratios (both paths of a round come from the same iterations when the bench pairs
them). Rows of several files or runs are pooled; the card is named from the rows. With a third
path (moe_forward_bench --record-align-16: gathered_a16; session 11's --record-align-128:
gathered_a128) a second table gives it against the
expanded path and against the gathered one, per round.
Usage: scripts/comm/moe_forward_table.py f.jsonl [more.jsonl ...] > table.md"""

import json
import statistics
import sys
from collections import defaultdict


def main(paths):
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    rows = [r for r in rows if r.get("bench") == "moe_forward"]
    if not rows:
        sys.exit("no moe_forward rows")
    # A new run starts where a (path, op, round) repeats.
    us = defaultdict(list)  # (op, path) -> [us]
    by_round = defaultdict(dict)  # (run, op, round) -> {path: us}
    run, seen = 0, set()
    for r in rows:
        key = (r["path"], r["op"], r["round"])
        if key in seen:
            run, seen = run + 1, set()
        seen.add(key)
        us[(r["op"], r["path"])].append(r["us"])
        by_round[(run, r["op"], r["round"])][r["path"]] = r["us"]
    gpus = {(r["gpu"], r["gpus"]) for r in rows}
    print(f"{' / '.join(f'{n} x {g}' for g, n in sorted(gpus))}; {run + 1} run(s), "
          f"{len(us[('forward', 'expanded')])} rounds in all; µs, medians over the rounds.\n")
    print("| op | expanded µs | gathered µs | gathered / expanded | per-round ratio: median (range) |")
    print("| --- | --- | --- | --- | --- |")
    ops = ["forward", "dispatch", "gemm", "scales"]

    def ratio(op, num, den):
        rs = [v[num] / v[den] for (k, o, _), v in by_round.items()
              if o == op and num in v and den in v]
        return f"{statistics.median(rs):.3f} ({min(rs):.3f}–{max(rs):.3f})"

    for op in ops:
        e, g = statistics.median(us[(op, "expanded")]), statistics.median(us[(op, "gathered")])
        print(f"| {op} | {e:.1f} | {g:.1f} | {g / e:.3f} | {ratio(op, 'gathered', 'expanded')} |")
    extra = sorted({r["path"] for r in rows} - {"expanded", "gathered"})
    for path in extra:
        print(f"\n| op | {path} µs | / expanded, per round | / gathered, per round |")
        print("| --- | --- | --- | --- |")
        for op in ops:
            print(f"| {op} | {statistics.median(us[(op, path)]):.1f} | "
                  f"{ratio(op, path, 'expanded')} | {ratio(op, path, 'gathered')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
