#!/usr/bin/env python3
"""gemm23: the local-memory instructions (12-bit opcode field 0x387 STL, 0x983 LDL; their counts match
ptxas -v's spill bytes) of every fp8_gemm_kernel in a -lineinfo cubin, each with its source chain
(from s12-prep/producer_sass_lines.py's line table). Usage: spills.py CUBIN"""
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s12-prep"))
import producer_sass_lines as t  # noqa: E402

data, secs = t.read_elf(sys.argv[1])
for kernel, rows, _ in t.line_sequences(data, secs):
    if not kernel or "fp8_gemm_kernel" not in kernel:
        continue
    text = next(s for s in secs if s["name"] == ".text." + kernel)
    n = text["size"] // 16

    def chain(r):
        out = []
        while r >= 0 and len(out) < 64:
            _, f, ln, inl = rows[r]
            out.append((f.split("/")[-1], ln))
            if inl == 0:
                break
            r = inl - 1
        return out

    print(kernel[40:95], n, "instructions")
    j = 0
    for i in range(n):
        while j + 1 < len(rows) and rows[j + 1][0] <= 16 * i:
            j += 1
        op = struct.unpack_from("<Q", data, text["off"] + 16 * i)[0] & 0xFFF
        if op in (0x983, 0x387):
            print("   ", "LDL" if op == 0x983 else "STL", hex(16 * i),
                  " <- ".join(f"{f}:{ln}" for f, ln in chain(j)[:4]))
