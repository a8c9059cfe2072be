#!/usr/bin/env python3
"""keep_entries.py IN.ptx OUT.ptx SUBSTR: drops every .entry whose mangled name lacks SUBSTR
(module header and variables kept)."""
import re, sys
lines = open(sys.argv[1]).read().split("\n")
out, i, keep = [], 0, True
start = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)*\.entry\s+(\S+?)\(")
while i < len(lines):
    m = start.match(lines[i])
    if m:
        keep = sys.argv[3] in m.group(1)
        # the entry ends at the first line that is exactly "}"
        j = i
        while lines[j] != "}":
            j += 1
        if keep:
            out.extend(lines[i:j + 1])
        i = j + 1
        continue
    out.append(lines[i]); i += 1
open(sys.argv[2], "w").write("\n".join(out))
