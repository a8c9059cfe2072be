#!/usr/bin/env python3
"""Tables of an ep_bench A/B (`--ab v1,v2,... --ab-rounds N`) made from its rows, not typed.

ab: the median over rounds of each variant's FP8 dispatch, layout-only dispatch and BF16 combine
(normal mode, our NVLink rows, note "ab=<variant> round=<r>"), with the rounds' range and the
change against the first variant; several files (e.g. another build's A/B of the same call) add
their variants below, named "<file stem>:<variant>". --trace LOG (the stdout+stderr of an A/B run
with FP8MOE_EP_TRACE=1) adds the phase stamps of the last dispatch before each variant's FP8
dispatch row, per rank, in µs after the plan kernel's start.

Usage: scripts/comm/ep_ab_table.py ab.jsonl [more.jsonl ...] [--trace trace.log] > table.md
"""

import json
import os
import re
import statistics
import sys

OPS = (("dispatch", "FP8 dispatch"), ("dispatch_layout_only", "layout only"),
       ("combine", "BF16 combine"))
STAMPS = ("plan_counted", "plan_published", "plan_last", "plan_end", "send_planned",
          "send_acked", "send_notified", "send_flags", "send_counts", "send_end", "recv_end")


def ab_rows(paths):
    table = {}  # (label, op) -> [us]
    order = []
    for i, path in enumerate(paths):
        stem = os.path.basename(path).split(".")[0]
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                r = json.loads(line)
                note = r.get("note", "")
                m = re.match(r"ab=(\S+) round=(\d+)", note)
                if not m or r.get("mode") != "normal" or r.get("impl") != "fp8moe":
                    continue
                label = m.group(1) if i == 0 else f"{stem}:{m.group(1)}"
                if label not in order:
                    order.append(label)
                table.setdefault((label, r["op"]), []).append(r["us"])
    return order, table


def trace_stamps(path):
    """[(variant, rank, {stamp: us})] for the trace lines before each FP8 dispatch row."""
    out, pending = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# ep_trace rank"):
                rank = int(line.split()[3])
                vals = dict(re.findall(r"([a-z_]+) (-?[0-9.]+)", line.split(":", 1)[1]))
                pending.append((rank, {k: float(v) for k, v in vals.items()}))
                pending = pending[-8:]
                continue
            m = re.search(r"\bnormal\s+dispatch\s+fp8\b.*ab=(\S+) round=", line)
            if m:
                seen = {}
                for rank, vals in pending:
                    seen[rank] = vals  # the last line of each rank before the row
                for rank in sorted(seen):
                    out.append((m.group(1), rank, seen[rank]))
            if re.search(r"\bnormal\s+\S+\s+(fp8|bf16)\b", line):
                pending = []
    return out


def main(argv):
    trace = None
    if "--trace" in argv:
        i = argv.index("--trace")
        trace = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if not argv:
        sys.exit(__doc__)
    order, table = ab_rows(argv)
    print("| variant | " + " | ".join(f"{name} µs (rounds)" for _, name in OPS) + " |")
    print("| --- |" + " --- |" * len(OPS))
    base = {op: statistics.median(table[(order[0], op)]) for op, _ in OPS
            if (order[0], op) in table}
    for label in order:
        cells = []
        for op, _ in OPS:
            v = table.get((label, op))
            if not v:
                cells.append("–")
                continue
            med = statistics.median(v)
            rel = f", {100 * (med / base[op] - 1):+.1f} %" if op in base and label != order[0] else ""
            cells.append(f"{med:.1f} ({min(v):.1f}–{max(v):.1f}{rel})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if trace:
        print()
        print("| variant | rank | " + " | ".join(STAMPS) + " |")
        print("| --- | --- |" + " --- |" * len(STAMPS))
        for variant, rank, vals in trace_stamps(trace):
            cells = [f"{vals[s]:.1f}" if vals.get(s, 0.0) > 0 else "–" for s in STAMPS]
            print(f"| {variant} | {rank} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
