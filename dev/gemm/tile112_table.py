#!/usr/bin/env python3
"""Small-M dense rows of gemm_bench runs with forced 128x112 rows (gemm29, session 17 late). First a
focus block at M = 128, N x K = 7168 x 16384 (the one H200 loser): per run the time of 128x112
split2 / split3 / unsplit, 128x128 split2 and the pick, 128x112 split2's time over 128x128 split2's
(< 1: faster) and cuBLASLt blockwise's over each (> 1: ours faster); then tile128x64_table.py's
per-shape tables (every row: us per run, x cuBLASLt, / pick).
Usage: tile112_table.py A.jsonl [B.jsonl ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mcast_table import ANCHOR, load  # noqa: E402  (beside this file)
from tile128x64_table import main as shape_tables  # noqa: E402

FOCUS = (128, 7168, 16384)


def find(rows, impl, *parts, without=()):
    for r in rows:
        tile = r.get("tile") or ""
        if r["impl"] == impl and all(p in tile for p in parts) and not any(w in tile for w in without):
            return r["us"]
    return None


def focus(paths):
    print(f"## Focus: M = {FOCUS[0]}, N x K = {FOCUS[1]} x {FOCUS[2]}\n")
    print("| run | 112 split2 | 112 split3 | 112 unsplit (w1) | 128 split2 | pick | cuBLASLt "
          "| 112s2 / 128s2 | x cuBLASLt 112s2 | x cuBLASLt 128s2 | x cuBLASLt pick |")
    print("|" + "---|" * 11)
    forced = "fp8moe_forced_tile"
    for i, p in enumerate(paths):
        rows = load(p).get(FOCUS, [])
        t112s2 = find(rows, forced, "128x112x", "/split2/")
        t112s3 = find(rows, forced, "128x112x", "/split3/")
        t112 = find(rows, forced, "128x112x", "/nosbpf", without=("/split",))
        t128s2 = find(rows, forced, "128x128x", "/split2/")
        pick = find(rows, "fp8moe")
        lt = find(rows, ANCHOR)
        f = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        r = lambda a, b: f"{a / b:.3f}" if a and b else "-"  # noqa: E731
        print(f"| {i + 1} | {f(t112s2)} | {f(t112s3)} | {f(t112)} | {f(t128s2)} | {f(pick)} | {f(lt)} "
              f"| {r(t112s2, t128s2)} | {r(lt, t112s2)} | {r(lt, t128s2)} | {r(lt, pick)} |")
    print()


if __name__ == "__main__":
    paths = [p for p in sys.argv[1:] if os.path.exists(p)]  # (a run cut short wrote none)
    if not paths:
        sys.exit(__doc__ + "\nno run files: " + " ".join(sys.argv[1:]))
    focus(paths)
    shape_tables(paths)
