#!/usr/bin/env python3
"""Prints the metrics whose names match any of the regular expressions, one line each, with the
value of every kernel of an ncu raw page (`ncu -i REP --page raw --csv`, plain or .gz) side by side
(session 11, gemm19). Usage: python3 ncu_raw_compare.py raw.csv.gz REGEX [REGEX ...]"""
import csv
import gzip
import re
import sys

path, pats = sys.argv[1], sys.argv[2:]
opener = gzip.open if path.endswith(".gz") else open
rows = list(csv.reader(opener(path, "rt")))
head, units, kernels = rows[0], rows[1], rows[2:]
for i, name in enumerate(head):
    if any(re.search(p, name) for p in pats):
        print(f"{name[:95]:95} {units[i][:8]:8} " + " | ".join(k[i][:14] for k in kernels))
