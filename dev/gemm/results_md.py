#!/usr/bin/env python3
"""Turns a gemm_bench JSONL file into the markdown table of docs/results/gemm-<date>-<gpu>.md.
Usage: python3 dev/gemm/results_md.py FILE.jsonl "exact command" > FILE.md"""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
command = sys.argv[2] if len(sys.argv) > 2 else "?"
gpu, date = rows[0]["gpu"], rows[0]["date"]
print(f"# FP8 GEMM benchmark — {gpu}, {date}\n")
print(f"Command (on the lent machine, after `bash scripts/device_build.sh gemm_bench`):\n`{command}`\n")
print("Median of CUDA-graph replays, inputs rotated over copies totalling >= 150 MB (L2 cannot hold")
print("them). TFLOPS = 2MNK / time. `vs blockwise` = cuBLASLt FP8 blockwise time / ours (> 1: ours")
print("faster). `rel_err`: ours against the CPU reference (gemm_fp8_reference, promoted) on 8 sampled")
print("rows; `diff`: ours against cuBLASLt blockwise on the whole output. All anchors from the same run.")
if any("us_first" in r for r in rows):
    print("Dense: ours (the heuristic's pick), the forced configurations and cuBLASLt blockwise timed in")
    print("alternation, the order rotated by one each round for as many rounds as rows (M >= 1024: every")
    print("row once at every place; M < 1024: 3 rounds), medians; `first` = ours timed alone right after")
    print("the inputs were made (TFLOPS).")
if any("sm_mhz" in r for r in rows):
    print("`MHz`: median SM clock (NVML) sampled after each graph replay of the row's own timings.")
print()
mhz = lambda r: f'{r["sm_mhz"]:.0f}' if r and r.get("sm_mhz") else "-"

dense = [r for r in rows if r["kind"] == "dense"]
key = lambda r: (r["m"], r["n"], r["k"])
shapes = []
for r in dense:
    if key(r) not in shapes:
        shapes.append(key(r))
print("## Dense (TFLOPS)\n")
print("| M | N | K | fp8moe | tile | cuBLASLt FP8 blockwise | ours / blockwise | cuBLASLt FP8 per-tensor | cuBLASLt BF16 | rel_err | diff vs cuBLASLt | first | MHz |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for s in shapes:
    by = {r["impl"]: r for r in dense if key(r) == s and r["impl"] != "fp8moe_forced_tile"}
    o = by.get("fp8moe", {})
    b = by.get("cublaslt_fp8_blockwise", {})
    t = by.get("cublaslt_fp8_tensor", {})
    f = by.get("cublaslt_bf16", {})
    fmt = lambda r: f'{r["tflops"]:.0f}' if r and r.get("tflops") else "n/a"
    ratio = f'{b["us"] / o["us"]:.2f}x' if o and b and b.get("us") else "n/a"
    print(f'| {s[0]} | {s[1]} | {s[2]} | {fmt(o)} | {o.get("tile", "")} | {fmt(b)} | {ratio} | {fmt(t)} | {fmt(f)} | '
          f'{o.get("rel_err", float("nan")):.1e} | {o.get("rel_diff_vs_cublaslt_blockwise", float("nan")):.1e} | '
          + (f'{2e-6 * s[0] * s[1] * s[2] / o["us_first"]:.0f} |' if o.get("us_first") else "- |")
          + f' {mhz(o)} |')
forced = [r for r in dense if r["impl"] == "fp8moe_forced_tile"]
# One table per M, with the tiles forced at that M as columns (the bench forces other tiles at
# small M than at M = 4096).
for m in sorted({r["m"] for r in forced}, reverse=True):
    at_m = [r for r in forced if r["m"] == m]
    print(f"\n## Dense M={m}, each tile forced (TFLOPS, ratio to cuBLASLt blockwise)\n")
    tiles = []
    for r in at_m:
        if r["tile"] not in tiles:
            tiles.append(r["tile"])
    print("| N | K | " + " | ".join(tiles) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in tiles) + " |")
    for s in shapes:
        fr = {r["tile"]: r for r in at_m if key(r) == s}
        if not fr:
            continue
        cells = [f'{fr[t]["tflops"]:.0f} ({fr[t].get("ratio_vs_cublaslt_blockwise", 0):.2f}x)' if t in fr else "" for t in tiles]
        print(f"| {s[1]} | {s[2]} | " + " | ".join(cells) + " |")
other = [r for r in rows if r["kind"] != "dense"]
if other:
    print("\n## Grouped and weight-gradient\n")
    print("The grouped forms have no cuBLASLt anchor. Weight-gradient rows (since session 7) are "
          "timed beside the anchor their `anchor` key names (cuBLASLt FP8 with FP32 output, "
          "beta = 1); `vs anchor` = its time / ours.\n")
    print("| kind | groups | rows (M) | N | K | impl | us | TFLOPS | GB/s | tile | vs anchor | rel_err | MHz |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in other:
        re = f'{r["rel_err"]:.1e}' if "rel_err" in r else ""
        anchor = r.get("anchor")
        ratio = r.get("ratio_vs_" + anchor) if anchor else None
        vs = f"{ratio:.2f}x {anchor}" if ratio else ""
        print(f'| {r["kind"]} | {r["groups"]} | {r["m"]} | {r["n"]} | {r["k"]} | {r["impl"]} | {r["us"]:.1f} | {r["tflops"]:.0f} | {r["gbps"]:.0f} | {r.get("tile", "")} | {vs} | {re} | {mhz(r)} |')
