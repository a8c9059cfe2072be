#!/usr/bin/env python3
"""The results tables of docs/results/nvlink-*.md, made from nvlink_bench's JSON lines.

For each (GPU pair, direction, bytes, background HBM blocks) in the rows: the copy engine's anchor
(the fastest peer_copy row of that group: the bench times it before and after its sweep), the best
mover of each kind with its share of the anchor, and per kind the best at each grid size (SMs), so
that "which method reaches >= 90 % of the copy engine, at how many SMs" reads off one table.
Rows of several commits in one file are an error (they must not be mixed).

Usage: scripts/comm/nvlink_results_table.py nvlink.jsonl[.gz] [more ...] > table.md
"""

import re
import sys

import jsonl_rows

KINDS = ("st", "ld", "bulkst", "bulkld", "stage")
LABEL = {"st": "SM stores (push)", "ld": "SM loads (pull)", "bulkst": "TMA bulk push",
         "bulkld": "TMA bulk pull", "stage": "staged TMA push (regs -> smem -> bulk)"}


def read_rows(paths):
    rows = jsonl_rows.read_rows(paths, lambda row: row.get("bench") == "nvlink")
    if not rows:
        sys.exit("no nvlink_bench rows")
    return rows


def blocks_of(mover):
    m = re.search(r":b(\d+)", mover)
    return int(m.group(1)) if m else 0


def size(b):
    return f"{b >> 20} MB" if b % (1 << 20) == 0 else f"{b} B"


def tables(rows):
    out = []
    first = rows[0]
    out.append(f"Rows: {len(rows)}; {first['gpu']} x {first['gpus']}; commit {first['commit']}; "
               f"date {first['date']}. GB/s per direction; share = GB/s over the copy engine's "
               "(cudaMemcpyPeerAsync, same bytes, same run).")
    groups = sorted({(r["src_gpu"], r["dst_gpu"], r["direction"], r["bytes"], r["hbm_blocks"])
                     for r in rows}, key=lambda g: (g[0], g[1], -g[3], g[2] != "one_way", g[4]))
    for src, dst, direction, nbytes, hbm in groups:
        g = [r for r in rows if (r["src_gpu"], r["dst_gpu"], r["direction"], r["bytes"],
                                 r["hbm_blocks"]) == (src, dst, direction, nbytes, hbm)]
        anchors = [r for r in g if r["impl"] == "peer_copy"]
        if not anchors:
            continue
        ce = max(anchors, key=lambda r: r["gbps"])
        ours = [r for r in g if r["impl"] == "fp8moe"]
        bad = [r for r in ours if r.get("checked") is False]
        out.append("")
        title = (f"### GPU {src} -> {dst}, {direction.replace('_', ' ')}, {size(nbytes)}"
                 + (f", beside {hbm} blocks of local HBM traffic" if hbm else ""))
        out.append(title)
        out.append("")
        note = f"copy engine {ce['gbps']:.1f} GB/s ({ce['us']:.2f} µs)"
        if hbm:
            note += (f"; local traffic {ce['hbm_gbps']:.0f} GB/s during the anchor (bytes read "
                     "plus written, both GPUs together)")
        if bad:
            note += f"; **{len(bad)} movers delivered wrong bytes**"
        out.append(note)
        out.append("")
        grids = sorted({blocks_of(r["mover"]) for r in ours})
        out.append("| kind | best mover | µs | GB/s | share | " +
                   " | ".join(f"{b} SMs" for b in grids) + " |")
        out.append("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in grids) + " |")
        for kind in KINDS:
            mine = [r for r in ours if r["kind"] == kind]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["us"])
            cells = []
            for b in grids:
                at = [r for r in mine if blocks_of(r["mover"]) == b]
                cells.append(f"{100 * min(at, key=lambda r: r['us'])['gbps'] / ce['gbps']:.0f} %"
                             if at else "")
            out.append(f"| {LABEL[kind]} | `{best['mover']}` | {best['us']:.2f} | "
                       f"{best['gbps']:.1f} | {100 * best['gbps'] / ce['gbps']:.1f} % | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.stdout.write(tables(read_rows(sys.argv[1:])))


if __name__ == "__main__":
    main()
