#!/usr/bin/env python3
"""Renumbers the inline-asm WAIT_<n> labels (mbar_wait's "%=": numbered across the whole module,
so a kernel added in front shifts every later kernel's labels) per function, before
tools/ptx_same_functions.py compares two PTX files (gemm14, session 8):
  renum_wait.py before.ptx b.ptx; renum_wait.py after.ptx a.ptx
  python3 tools/ptx_same_functions.py --before b.ptx --after a.ptx
Usage: renum_wait.py IN.ptx OUT.ptx"""
import re
import sys

FUNC = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(entry|func)\b")
WAIT = re.compile(r"WAIT_\d+")

out, names = [], {}
for line in open(sys.argv[1]):
    if FUNC.match(line):
        names = {}

    def sub(m):
        return names.setdefault(m.group(0), f"WAIT_n{len(names)}")

    out.append(WAIT.sub(sub, line))
open(sys.argv[2], "w").write("".join(out))
