#!/usr/bin/env python3
"""Tables of an ep_bench A/B (`--ab v1,v2,... --ab-rounds N`) made from its rows, not typed.

ab: the median over rounds of each variant's FP8 dispatch, layout-only dispatch and BF16 combine
(normal mode, our NVLink rows, note "ab=<variant> round=<r>"), with the rounds' range and the
change against the first variant; several files (e.g. another build's A/B of the same call) add
their variants below, named "<file stem>:<variant>". --trace LOG (the stdout+stderr of an A/B run
with FP8MOE_EP_TRACE=1) adds the phase stamps of the last dispatch before each variant's FP8
dispatch row, per rank, in µs after the plan kernel's start.

--mode low_latency tables the low-latency rows of the same A/B instead (FP8 dispatch and BF16
combine; NCCL's all-to-all of the same bytes in the same file, when there, as a last row), and
--ll-trace LOG (an A/B run with FP8MOE_EP_LL_TRACE=1) adds the low-latency phase stamps printed
before each variant's low-latency dispatch row, per rank, in µs after send block 0 started.

Usage: scripts/comm/ep_ab_table.py ab.jsonl [more.jsonl ...] [--trace trace.log]
       [--mode low_latency] [--ll-trace trace.log] > table.md
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


LL_OPS = (("dispatch", "FP8 dispatch"), ("combine", "BF16 combine"))
# The dispatch stamps of print_trace (src/comm/sm90_device_ep_ll.cu), in its order; flags-in and
# copies-issued were printed by the build of docs/comm/runs/ep-s9-ll-JMEH.patch only ("–" else).
# "payload issued": session 13's payload_first (P) only.
LL_STAMPS = (("dispatch", ("send last-start", "send cleared", "payload issued", "plan-tiles",
                           "plan", "ack", "payload", "end")),
             ("recv", ("first-start", "last-start", "notify", "layout", "flags-in",
                       "copies-issued", "scatter", "end")))


def ab_rows(paths, mode="normal"):
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
                if mode != "normal" and r.get("impl") == "nccl" and r.get("mode") == mode:
                    if r.get("op") in dict(LL_OPS):
                        if "nccl" not in order:
                            order.append("nccl")
                        table.setdefault(("nccl", r["op"]), []).append(r["us"])
                    continue
                # ep_bench --ab rows: "ab=<variant>"; --ab-ll rows: "ab_ll=<variant>".
                m = re.match(r"ab(?:_ll)?=(\S+) round=(\d+)", note)
                if not m or r.get("mode") != mode or r.get("impl") != "fp8moe":
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


def ll_trace_stamps(path):
    """[(variant, rank, {"dispatch send last-start": us, ...})]: the ll_trace lines printed
    before each low-latency dispatch row (check() after the timed dispatch), the last of each
    rank."""
    out, pending = [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"ll_trace rank (\d+) dispatch (\(|detail:|receive items:|payload-first:)",
                         line)
            if m:
                rank = int(m.group(1))
                body = line.split("):", 1)[1] if m.group(2) == "(" else line.split(":", 1)[1]
                parts = body.split("|")
                sides = ("recv",) if m.group(2) == "receive items:" else ("dispatch", "recv")
                vals = pending.setdefault(rank, {})
                for side, part in zip(sides, parts):
                    for k, v in re.findall(r"([a-z][a-z -]*?) (-?[0-9]+\.[0-9]+)", part):
                        k = k.strip()
                        if side == "recv" and k.startswith("recv "):
                            k = k[5:]
                        vals[f"{side} {k}"] = float(v)
                continue
            m = re.search(r"\blow_latency\s+dispatch\s+fp8\b.*ab(?:_ll)?=(\S+) round=", line)
            if m:
                for rank in sorted(pending):
                    out.append((m.group(1), rank, pending[rank]))
                pending = {}
            if re.search(r"\blow_latency\s+combine\b", line):
                pending = {}  # --ab-ll: the check() after the combine prints the dispatch again
    return out


def main(argv):
    trace = ll_trace = None
    mode = "normal"
    for flag in ("--trace", "--mode", "--ll-trace"):
        if flag in argv:
            i = argv.index(flag)
            if flag == "--trace":
                trace = argv[i + 1]
            elif flag == "--mode":
                mode = argv[i + 1]
            else:
                ll_trace = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
    if not argv:
        sys.exit(__doc__)
    ops = OPS if mode == "normal" else LL_OPS
    order, table = ab_rows(argv, mode)
    if "nccl" in order:
        order.remove("nccl")
        order.append("nccl")
    print("| variant | " + " | ".join(f"{name} µs (rounds)" for _, name in ops) + " |")
    print("| --- |" + " --- |" * len(ops))
    base = {op: statistics.median(table[(order[0], op)]) for op, _ in ops
            if (order[0], op) in table}
    for label in order:
        cells = []
        for op, _ in ops:
            v = table.get((label, op))
            if not v:
                cells.append("–")
                continue
            med = statistics.median(v)
            rel = f", {100 * (med / base[op] - 1):+.1f} %" if op in base and label != order[0] else ""
            cells.append(f"{med:.1f} ({min(v):.1f}–{max(v):.1f}{rel})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if ll_trace:
        print()
        for side, names in LL_STAMPS:
            cols = [f"{side} {n}" for n in names]
            print(f"| variant | rank | " + " | ".join(n for n in names) + " |")
            print("| --- | --- |" + " --- |" * len(names))
            for variant, rank, vals in ll_trace_stamps(ll_trace):
                cells = [f"{vals[c]:.2f}" if vals.get(c, -1.0) >= 0 else "–" for c in cols]
                print(f"| {variant} | {rank} | " + " | ".join(cells) + " |")
            print()
    if trace:
        print()
        print("| variant | rank | " + " | ".join(STAMPS) + " |")
        print("| --- | --- |" + " --- |" * len(STAMPS))
        for variant, rank, vals in trace_stamps(trace):
            cells = [f"{vals[s]:.1f}" if vals.get(s, 0.0) > 0 else "–" for s in STAMPS]
            print(f"| {variant} | {rank} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
