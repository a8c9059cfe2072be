#!/usr/bin/env python3
"""Small-M dense rows of gemm_bench runs with GemmTileConfig::split_k_cluster rows (tile
descriptions with /csplit2 or /csplit4, gemm27, session 16; adapted from mcast_table.py). Per
shape, one line per fp8moe row and the cuBLASLt blockwise anchor: the time of each run, then per
run cuBLASLt's time over ours (> 1: ours faster) and, for a /csplitN row, its time over the same
forced tile with the workspace split (/splitN, same stages) in the same run (< 1: the cluster
reduction helps).
Usage: csplit_table.py A.jsonl [B.jsonl ...]"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mcast_table  # noqa: E402  (the same table; only the variant's marker differs)

if __name__ == "__main__":
    mcast_table.main(
        sys.argv[1:], re.compile(r"/csplit(\d+)"), lambda m: "/split" + m.group(1)
    )
