#!/usr/bin/env python3
"""Short table of a gemm_bench --m 128,64 run (JSON lines): per shape the heuristic's row, the
pre-split-K pick (no workspace), the best forced row, cuBLASLt blockwise, and the ratios
(cuBLASLt time / ours, > 1: ours faster). Usage: splitk_summary.py gemm_small.jsonl"""
import json
import sys
from collections import OrderedDict

shapes = OrderedDict()
for line in open(sys.argv[1]):
    r = json.loads(line)
    shapes.setdefault((r["m"], r["n"], r["k"]), []).append(r)
print(f"{'M':>4} {'N':>6} {'K':>6} | {'heur us':>8} {'x':>5} {'tile':<28} | {'nosplit':>8} {'x':>5} |"
      f" {'best forced':<26} {'us':>7} {'x':>5} | {'cublas':>7} | maxdiff")
for (m, n, k), rows in shapes.items():
    by = {r["impl"]: r for r in rows if r["impl"] != "fp8moe_forced_tile"}
    forced = [r for r in rows if r["impl"] == "fp8moe_forced_tile"]
    h, ns, lt = by.get("fp8moe"), by.get("fp8moe_nosplit"), by.get("cublaslt_fp8_blockwise")
    best = min(forced, key=lambda r: r["us"]) if forced else None
    diff = max(r.get("rel_diff_vs_cublaslt_blockwise", 0) for r in rows)
    x = lambda r: r.get("ratio_vs_cublaslt_blockwise", 0) if r else 0
    print(f"{m:>4} {n:>6} {k:>6} | {h['us']:8.2f} {x(h):5.2f} {h['tile']:<28} | {ns['us']:8.2f} "
          f"{x(ns):5.2f} | {best['tile']:<26} {best['us']:7.2f} {x(best):5.2f} | "
          f"{lt['us'] if lt else 0:7.2f} | {diff:.1e}")
