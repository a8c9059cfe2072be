#!/usr/bin/env python3
"""Ranges of the combine's FP8MOE_EP_TRACE=1 stamps per A/B variant, from an ep_bench --ab log.
check() prints each group's last-combine stamps before that variant's next combine row, so the
"# ep_trace_combine" lines seen before a "combine ... ab=<variant>" row are that variant's.
Usage: python3 ep27-combine-stamps.py ab.log"""
import collections
import re
import sys

stamps, pending = collections.defaultdict(list), []
for line in open(sys.argv[1]):
    m = re.match(r"# ep_trace_combine rank \d .*send_first_end ([\d.]+) send_end ([\d.]+) "
                 r"recv_start [\d.]+ recv_end ([\d.]+)", line)
    if m:
        pending.append(tuple(map(float, m.groups())))
        continue
    m = re.search(r"normal +combine .* ab=(\S+) round=\d", line)
    if m:
        stamps[m.group(1)] += pending
        pending = []
print("| variant | stamps | send_first_end | send_end | recv_end | recv_end - send_end |")
print("| --- | --- | --- | --- | --- | --- |")
for v, xs in stamps.items():
    cols = [[x[0] for x in xs], [x[1] for x in xs], [x[2] for x in xs], [x[2] - x[1] for x in xs]]
    print(f"| {v} | {len(xs)} | " + " | ".join(f"{min(c):.1f}–{max(c):.1f}" for c in cols) + " |")
