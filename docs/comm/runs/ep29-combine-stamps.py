#!/usr/bin/env python3
"""Ranges of the combine's FP8MOE_EP_TRACE=1 stamps per A/B variant, from an ep_bench --ab log (as
ep28-combine-stamps.py), plus the receive's tail that combine_recv_own_first's kernel records
(ep_bench letters h and y; session 15 late, ep29): when the receive's claims ran out
(recv_claims_out), the last chunk wait that ended (recv_last_wait), the last warp done with its
items (recv_work_end), all in us from the first send block, and the items whose chunks had not
landed at their first look (waited_items, here in % of 4 T items: 4 parts a token at the V3 shape).
check() prints each group's last-combine stamps before that variant's next combine row, so the
"# ep_trace_combine" lines seen before a "combine ... ab=<variant>" row are that variant's.
Usage: python3 ep29-combine-stamps.py ab.log [tokens, default 4096]"""
import collections
import re
import sys

tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
stamps, tails = collections.defaultdict(list), collections.defaultdict(list)
pending, pending_tails = [], []
for line in open(sys.argv[1]):
    m = re.match(r"# ep_trace_combine rank (\d) .*send_first_end ([\d.]+) send_end ([\d.]+) "
                 r"recv_start [\d.]+ recv_end ([\d.]+)", line)
    if m:
        pending.append((int(m.group(1)),) + tuple(map(float, m.groups()[1:])))
        continue
    m = re.match(r"# ep_trace_combine rank (\d): recv_claims_out ([-\d.]+) recv_last_wait ([-\d.]+) "
                 r"recv_work_end ([-\d.]+) waited_items (\d+)", line)
    if m:
        rank = int(m.group(1))
        # The rank's standard stamps precede its tail line.
        base = [p for p in pending if p[0] == rank]
        if base:
            _, _, send_end, recv_end = base[-1]
            out, wait, work, waited = map(float, m.groups()[1:])
            pending_tails.append((out - send_end, wait - send_end, work - wait, recv_end - work,
                                  100.0 * waited / (4 * tokens)))
        continue
    m = re.search(r"normal +combine .* ab=(\S+) round=\d", line)
    if m:
        stamps[m.group(1)] += pending
        tails[m.group(1)] += pending_tails
        pending, pending_tails = [], []


def rng(xs, fmt="{:.1f}"):
    return (fmt.format(min(xs)) + "–" + fmt.format(max(xs))) if xs else "–"


print("| variant | stamps | send_first_end | send_end | spread | recv_end | recv_end - send_end |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for v, xs in stamps.items():
    cols = [[x[1] for x in xs], [x[2] for x in xs], [x[2] - x[1] for x in xs], [x[3] for x in xs],
            [x[3] - x[2] for x in xs]]
    print(f"| {v} | {len(xs)} | " + " | ".join(rng(c) for c in cols) + " |")
print()
print("| variant | tails | claims_out - send_end | last_wait - send_end | work_end - last_wait "
      "| recv_end - work_end | waited items (% of 4 T) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for v, xs in tails.items():
    if not xs:
        continue
    cols = [[x[i] for x in xs] for i in range(5)]
    print(f"| {v} | {len(xs)} | " + " | ".join(rng(c) for c in cols) + " |")
