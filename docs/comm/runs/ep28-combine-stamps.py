#!/usr/bin/env python3
"""Ranges of the combine's FP8MOE_EP_TRACE=1 stamps per A/B variant, from an ep_bench --ab log
(ep27-combine-stamps.py's table), plus the block spread send_end - send_first_end and, for the
claimed send (combine_send_claims, letter e), the receive's claimed items when the send's last
block ended ("recv_items_at_send_end N of T tokens' items"; 4 items a token at the V3 shape).
check() prints each group's last-combine stamps before that variant's next combine row, so the
"# ep_trace_combine" lines seen before a "combine ... ab=<variant>" row are that variant's.
Usage: python3 ep28-combine-stamps.py ab.log"""
import collections
import re
import sys

stamps, items = collections.defaultdict(list), collections.defaultdict(list)
pending, pending_items = [], []
for line in open(sys.argv[1]):
    m = re.match(r"# ep_trace_combine rank \d .*send_first_end ([\d.]+) send_end ([\d.]+) "
                 r"recv_start [\d.]+ recv_end ([\d.]+)", line)
    if m:
        pending.append(tuple(map(float, m.groups())))
        continue
    m = re.match(r"# ep_trace_combine rank \d: recv_items_at_send_end (\d+) of (\d+) tokens", line)
    if m:
        pending_items.append(int(m.group(1)) / (4 * int(m.group(2))))
        continue
    m = re.search(r"normal +combine .* ab=(\S+) round=\d", line)
    if m:
        stamps[m.group(1)] += pending
        items[m.group(1)] += pending_items
        pending, pending_items = [], []
print("| variant | stamps | send_first_end | send_end | spread | recv_end | recv_end - send_end "
      "| recv items claimed at send_end (of 4 T) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for v, xs in stamps.items():
    cols = [[x[0] for x in xs], [x[1] for x in xs], [x[1] - x[0] for x in xs], [x[2] for x in xs],
            [x[2] - x[1] for x in xs]]
    it = items[v]
    its = f"{100 * min(it):.1f}–{100 * max(it):.1f} %" if it else "–"
    print(f"| {v} | {len(xs)} | " + " | ".join(f"{min(c):.1f}–{max(c):.1f}" for c in cols) +
          f" | {its} |")
