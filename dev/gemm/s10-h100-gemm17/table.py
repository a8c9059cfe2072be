#!/usr/bin/env python3
"""The gathered grouped GEMM against the contiguous one (gemm_bench --only gathered rows), one
line per pair of rows of the same run (contiguous on the materialised rows, then gathered on the
records), and the scale gather's rows. Usage: python3 table.py call1 call2 call3 > table.md"""
import glob
import json
import os
import sys

PRODUCER = {
    "call1": "one {128 K, 1 row} TMA box per row",
    "call2": "cp.async, one producer warp (rolled loop)",
    "call3": "cp.async, the producer warpgroup (4 warps)",
}
print("# The gathered grouped contiguous GEMM (gemm17, session 10), H100 SXM\n")
print("Each pair: `fp8_gemm_nt_grouped_contiguous` on the materialised rows and")
print("`fp8_gemm_nt_grouped_contiguous_gathered` on the records (each source row used by 4 logical")
print("rows in random order), same data, timed in alternation in one process (7 rounds, forced rows")
print("5), medians of CUDA-graph replays; outputs bit-identical in every pair (checked by the bench).")
print("`ratio` = gathered / contiguous time. `MHz`: median SM clock of the row's timings.\n")
print("| call | producer | file | groups x rows | N x K | tile | contiguous us | gathered us | ratio | MHz c/g |")
print("|---|---|---|---|---|---|---:|---:|---:|---|")
scales = []
for d in sys.argv[1:]:
    name = os.path.basename(os.path.normpath(d))
    for f in sorted(glob.glob(os.path.join(d, "*.jsonl"))):
        rows = [json.loads(l) for l in open(f) if l.strip()]
        for i, r in enumerate(rows):
            if r["kind"] == "gather_scales":
                scales.append((name, os.path.basename(f), r))
            if r["kind"] != "grouped_contiguous_gathered":
                continue
            c = rows[i - 1]
            assert c["kind"] == "grouped_contiguous" and (c["m"], c["n"], c["k"], c["groups"]) == (
                r["m"], r["n"], r["k"], r["groups"])
            mhz = f'{c.get("sm_mhz", 0):.0f}/{r.get("sm_mhz", 0):.0f}'
            print(f'| {name} | {PRODUCER.get(name, "?")} | {os.path.basename(f)} | '
                  f'{r["groups"]} x {r["m"] // r["groups"]} | {r["n"]} x {r["k"]} | {r["tile"]} | '
                  f'{c["us"]:.1f} | {r["us"]:.1f} | {r["us"] / c["us"]:.3f} | {mhz} |')
print("\nScale gather (`gather_scales_to_mn_major`, records -> [KB][pad(M)], M = 32768):\n")
print("| call | file | K | us | GB/s |")
print("|---|---|---|---:|---:|")
for name, f, r in scales:
    print(f'| {name} | {f} | {r["k"]} | {r["us"]:.1f} | {r["gbps"]:.0f} |')
