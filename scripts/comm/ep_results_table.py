#!/usr/bin/env python3
"""The results table of docs/results/ep-*.md, made from ep_bench's JSON lines instead of typed.

For each (number of ranks, mode) in the files: the best of our NVLink rows per op (FP8 dispatch,
FP8 layout-only dispatch, BF16 combine, BF16 combine of one row per received token: the bytes
NCCL's anchor moves) against the anchors of the same run, as ep_bench's own
"# summary" computes them: NCCL all-to-all of the same bytes, and the bidirectional peer copy of
the bytes that cross (note fp8_dispatch_cross_bytes / bf16_combine_cross_bytes). Rows of several
runs (e.g. a 2-GPU and a 4-GPU sweep in one file) are told apart by their "ranks" field; several
commits in one file are an error, since their rows must not be mixed.

Rows replayed from CUDA graphs (ep_bench --graph N / --ll-graph N: note "graph_rounds=N ...") stay
out of that table; with --graph the table is theirs instead: the normal mode's ops replayed from
graphs (µs per round, the best variant) against NCCL's graphs of the same bytes, the peer copy of
the same run (eager: it has no graph), and the eager row of ours beside them.

Usage: scripts/comm/ep_results_table.py [--graph] ep.jsonl [more.jsonl ...] > table.md
"""

import sys

import jsonl_rows

OPS = (("dispatch", "fp8", "FP8 dispatch"),
       ("dispatch_layout_only", "fp8", "FP8 dispatch, layout only"),
       ("combine", "bf16", "BF16 combine"),
       ("combine_tokens", "bf16", "BF16 combine of token rows"))
MODES = (("normal", ""), ("low_latency", "low-latency "))


def read_rows(paths):
    return jsonl_rows.read_rows(paths, lambda row: row.get("bench") == "ep" and "ranks" in row)


def is_graph(row):
    return row.get("note", "").startswith("graph_rounds=")


def best(rows, ranks, impl, mode, op, dtype, note=None, graph=False):
    found = [r for r in rows
             if r["ranks"] == ranks and r.get("impl") == impl and r.get("mode") == mode
             and r.get("op") == op and r.get("dtype") == dtype
             and (note is None or r.get("note") == note) and is_graph(r) == graph]
    return min(found, key=lambda r: r["us"]) if found else None


def table(rows):
    out = ["| ranks | op | ours µs | NCCL all-to-all µs | ours / NCCL | peer copy µs "
           "| share of peer bandwidth |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for ranks in sorted({r["ranks"] for r in rows}):
        for mode, label in MODES:
            for op, dtype, name in OPS:
                ours = best(rows, ranks, "fp8moe", mode, op, dtype)
                if ours is None:
                    continue
                comb = op.startswith("combine")
                nccl = best(rows, ranks, "nccl", mode, "combine" if comb else "dispatch", dtype)
                peer = best(rows, ranks, "peer_copy", mode, "copy_bidirectional", "bytes",
                            "bf16_combine_cross_bytes" if comb else "fp8_dispatch_cross_bytes")
                cells = [str(ranks), label + name, f"{ours['us']:.1f}"]
                cells += [f"{nccl['us']:.1f}", f"{nccl['us'] / ours['us']:.2f}×"] if nccl else ["", ""]
                cells += ([f"{peer['us']:.1f}", f"{100 * peer['us'] / ours['us']:.0f} %"]
                          if peer else ["", ""])
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def graph_table(rows):
    out = ["| ranks | op (graph replays) | ours µs a round | NCCL graph µs | ours / NCCL "
           "| peer copy µs | share of peer bandwidth | eager: ours µs, ours / NCCL |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for ranks in sorted({r["ranks"] for r in rows}):
        for op, dtype, name in OPS:
            ours = best(rows, ranks, "fp8moe", "normal", op, dtype, graph=True)
            if ours is None:
                continue
            comb = op.startswith("combine")
            nop = "combine" if comb else "dispatch"
            nccl = best(rows, ranks, "nccl", "normal", nop, dtype, graph=True)
            peer = best(rows, ranks, "peer_copy", "normal", "copy_bidirectional", "bytes",
                        "bf16_combine_cross_bytes" if comb else "fp8_dispatch_cross_bytes")
            eager = best(rows, ranks, "fp8moe", "normal", op, dtype)
            eager_nccl = best(rows, ranks, "nccl", "normal", nop, dtype)
            cells = [str(ranks), name, f"{ours['us']:.1f}"
                     + (" MISMATCH" if ours.get("checked") is False else "")]
            cells += [f"{nccl['us']:.1f}", f"{nccl['us'] / ours['us']:.2f}×"] if nccl else ["", ""]
            cells += ([f"{peer['us']:.1f}", f"{100 * peer['us'] / ours['us']:.0f} %"]
                      if peer else ["", ""])
            cells.append(f"{eager['us']:.1f}" + (f", {eager_nccl['us'] / eager['us']:.2f}×"
                                                 if eager_nccl else "") if eager else "")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    args = sys.argv[1:]
    graph = "--graph" in args
    paths = [a for a in args if a != "--graph"]
    if not paths:
        sys.exit(__doc__)
    rows = read_rows(paths)
    if not rows:
        sys.exit("no ep_bench rows in " + ", ".join(paths))
    print(graph_table(rows) if graph else table(rows))


if __name__ == "__main__":
    main()
