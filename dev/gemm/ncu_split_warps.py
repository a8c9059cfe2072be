#!/usr/bin/env python3
"""Splits an ncu source page's stall samples (`--page source --print-source sass --csv`, plain or
.gz) of fp8_gemm_kernel between the math warpgroups (SASS between USETMAXREG.TRY_ALLOC and
USETMAXREG.DEALLOC) and the producer (from the DEALLOC on), with each side's main stall reasons
(session 11, gemm19). The sampler takes one warp of a sub-partition at a time, so compare the
shares within a side across kernels, not the totals. Usage: python3 ncu_split_warps.py F [F ...]"""
import collections
import sys

from ncu_page import SourcePage

for path in sys.argv[1:]:
    page = SourcePage(path)
    col, stalls, ins = page.col, page.stalls, page.instrs
    base = int(ins[0][0], 16)
    offs = [(int(r[0], 16) - base, r) for r in ins]
    dealloc = [o for o, r in offs if "USETMAXREG.DEALLOC" in r[1]][0]
    alloc = [o for o, r in offs if "USETMAXREG.TRY_ALLOC" in r[1]][0]
    groups = collections.defaultdict(collections.Counter)
    for o, r in offs:
        g = "prologue" if o < alloc else "math" if o < dealloc else "producer"
        for h in stalls:
            groups[g][h[6:]] += int(r[col[h]] or 0)
        groups[g]["_all"] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
    print(path)
    for g, c in groups.items():
        n = c["_all"]
        top = ", ".join(f"{k} {v} ({100 * v / max(n, 1):.1f}%)" for k, v in c.most_common(8)
                        if k != "_all")
        print(f"  {g:8} {n:7}  {top}")
