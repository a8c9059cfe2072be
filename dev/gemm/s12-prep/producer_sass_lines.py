#!/usr/bin/env python3
"""Counts a kernel's SASS instructions per source line of one function, from a cubin alone (this
machine has no cuobjdump / nvdisasm): every sm_90 instruction is 16 bytes, and a -lineinfo cubin's
.debug_line maps each instruction address to its source line, with NVIDIA's extended opcode 144
(two ULEB128s: the 1-based row of the inlined-at call site, 0 for none, and the function name's
.debug_str offset) chaining inlined helpers to their call sites. An instruction is charged to the
first frame of its chain on a --loop line of --file (the producer's K loop), so the helpers'
instructions (mbar_wait, cp.async, fences) count at the line that called them.

The K loop's body in the SASS: from the K loop's mbar_wait (the instructions charged to the
--wait line right before and including the try_wait) forward to the last instruction charged to a
line of --loop (the back edge: the instruction before the first one of a --stop line); per-tile
code that the compiler hoisted out of it sits before it.
Checked against the device: for the landed 128x256 kernel this gives 125 instructions, the same
as the K loop of gemm19's ncu source page (dev/gemm/s11-h100-gemm19/call2, same nvcc, same PTX).
Usage:
  python3 producer_sass_lines.py CUBIN --kernel SUBSTR --file NAME --loop L0-L1 --wait LINE
      --stop L0-L1[,..]
      [--group NAME=L0-L1[,..] ...] [--dump]
--names CSV.GZ:KERNEL names the instructions (opcode_names). Prints the body's instruction count
(and with --names its mnemonics), then per --group the instructions with a frame on its lines
(e.g. the TMA issue that only thread 0 runs, the branch of the other arrival depth).
"""
import argparse
import collections
import csv
import gzip
import struct
import sys


def uleb(data, pos):
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, pos


def sleb(data, pos):
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            if b & 0x40:
                result -= 1 << shift
            return result, pos


def read_elf(path):
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "64-bit ELF expected"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = []
    for i in range(shnum):
        name, typ, flags, addr, off, size, link, info, align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        secs.append(dict(name_off=name, type=typ, off=off, size=size, link=link, info=info,
                         entsize=entsize))
    strtab = secs[shstrndx]
    for s in secs:
        end = data.index(b"\0", strtab["off"] + s["name_off"])
        s["name"] = data[strtab["off"] + s["name_off"]:end].decode()
    return data, secs


def symbols(data, secs):
    symtab = next(s for s in secs if s["type"] == 2)
    strs = secs[symtab["link"]]
    out = []
    for i in range(symtab["size"] // 24):
        name, info, other, shndx, value, size = struct.unpack_from("<IBBHQQ", data,
                                                                   symtab["off"] + 24 * i)
        end = data.index(b"\0", strs["off"] + name)
        out.append(dict(name=data[strs["off"] + name:end].decode(), shndx=shndx, value=value))
    return out


def line_sequences(data, secs):
    """Rows (address, file, line, inlined_at_row) of each sequence, with the kernel it belongs to
    (from .rela.debug_line: the symbol of each sequence's set_address)."""
    sec = next(s for s in secs if s["name"] == ".debug_line")
    rela = next(s for s in secs if s["name"] == ".rela.debug_line")
    syms = symbols(data, secs)
    reloc = {}
    for i in range(rela["size"] // 24):
        off, info, addend = struct.unpack_from("<QQq", data, rela["off"] + 24 * i)
        reloc[off] = syms[info >> 32]["name"]
    base = sec["off"]
    end_all = base + sec["size"]
    pos = base
    seqs = []
    while pos < end_all:
        unit_len = struct.unpack_from("<I", data, pos)[0]
        unit_end = pos + 4 + unit_len
        version = struct.unpack_from("<H", data, pos + 4)[0]
        hdr_len = struct.unpack_from("<I", data, pos + 6)[0]
        prog = pos + 10 + hdr_len
        min_inst, default_stmt, line_base, line_range, opcode_base = struct.unpack_from(
            "<BBbBB", data, pos + 10)
        p = pos + 15 + opcode_base - 1
        dirs = []
        while data[p] != 0:
            e = data.index(b"\0", p)
            dirs.append(data[p:e].decode())
            p = e + 1
        p += 1
        files = []
        while data[p] != 0:
            e = data.index(b"\0", p)
            files.append(data[p:e].decode())
            p = e + 1
            _, p = uleb(data, p)
            _, p = uleb(data, p)
            _, p = uleb(data, p)
        assert version == 2, version
        p = prog
        addr, file, line, inl = 0, 1, 1, 0
        rows, kernel = [], None
        while p < unit_end:
            op = data[p]
            p += 1
            emit = False
            if op >= opcode_base:
                adj = op - opcode_base
                addr += (adj // line_range) * min_inst
                line += line_base + adj % line_range
                emit = True
            elif op == 0:
                length, p = uleb(data, p)
                sub = data[p]
                if sub == 1:  # end_sequence
                    seqs.append((kernel, rows, addr))
                    rows, kernel = [], None
                    addr, file, line, inl = 0, 1, 1, 0
                elif sub == 2:
                    kernel = reloc.get(p + 1 - base)
                    addr = struct.unpack_from("<Q", data, p + 1)[0]
                elif sub == 144:
                    inl, q = uleb(data, p + 1)
                p += length
            elif op == 1:
                emit = True
            elif op == 2:
                v, p = uleb(data, p)
                addr += v * min_inst
            elif op == 3:
                v, p = sleb(data, p)
                line += v
            elif op == 4:
                file, p = uleb(data, p)
            elif op in (5,):
                _, p = uleb(data, p)
            elif op == 9:
                addr += struct.unpack_from("<H", data, p)[0]
                p += 2
            elif op == 8:
                addr += ((255 - opcode_base) // line_range) * min_inst
            if emit:
                rows.append((addr, files[file - 1], line, inl))
                inl = 0
        pos = unit_end
    return seqs


def opcode_names(data, secs, spec):
    """--names CSV.GZ:KERNEL: an ncu source page (--page source --print-source sass --csv) of
    KERNEL, a kernel of this cubin built from the same PTX: the mnemonic of each 12-bit opcode
    field (bits 0-11 of an instruction's low word), learnt from its instructions side by side."""
    path, kernel = spec.rsplit(":", 1)
    rows = list(csv.reader(gzip.open(path, "rt") if path.endswith(".gz") else open(path)))
    body = []
    for r in rows[2:]:
        if r and r[0] == "Kernel Name":
            break
        body.append(r)
    sec = next(s for s in secs if s["name"].startswith(".text.") and kernel in s["name"])
    if len(body) != sec["size"] // 16:
        sys.exit(f"{path}: {len(body)} instructions, the cubin's {kernel}: {sec['size'] // 16}")
    base = int(body[0][0], 16)
    names = collections.defaultdict(set)
    for r in body:
        lo = struct.unpack_from("<Q", data, sec["off"] + int(r[0], 16) - base)[0]
        words = r[1].split()
        names[lo & 0xFFF].add((words[1] if words[0].startswith("@") else words[0]).split(".")[0])
    return {k: "/".join(sorted(v)) for k, v in names.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cubin")
    ap.add_argument("--kernel", required=True, help="substring of the kernel's mangled name")
    ap.add_argument("--file", required=True, help="the producer's source file (name suffix)")
    ap.add_argument("--loop", required=True, help="L0-L1: the K loop's lines in --file")
    ap.add_argument("--wait", type=int, required=True,
                    help="the line of the K loop's mbar_wait call (its first statement)")
    ap.add_argument("--stop", required=True,
                    help="L0-L1[,..]: lines of the code after the K loop (the tile loop's step, "
                    "the drain after the loops)")
    ap.add_argument("--group", action="append", default=[],
                    help="NAME=L0-L1[,L2-L3...]: instructions with a frame on these lines")
    ap.add_argument("--nth", type=int, default=0,
                    help="the n-th K loop in address order (a producer instantiated twice, e.g. "
                    "for two arrival depths)")
    ap.add_argument("--names", help="CSV.GZ:KERNEL, see opcode_names: name the instructions")
    ap.add_argument("--dump", action="store_true", help="print each instruction's chain")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.loop.split("-"))
    data, secs = read_elf(args.cubin)
    all_seqs = line_sequences(data, secs)
    seqs = [s for s in all_seqs if s[0] and args.kernel in s[0]]
    if len(seqs) != 1:
        sys.exit(f"{len(seqs)} line sequences match {args.kernel!r}: "
                 + ", ".join(s[0] or "?" for s in all_seqs))
    kernel, rows, end = seqs[0]
    text = next(s for s in secs if s["name"] == ".text." + kernel)
    n_ins = text["size"] // 16

    def chain(r):
        out = []
        while r >= 0 and len(out) < 64:
            a, f, ln, inl = rows[r]
            out.append((f, ln))
            if inl == 0:
                break
            r = inl - 1
        return out

    # The chain of each instruction: from the last row at the largest address <= its address (rows
    # at one address run from the outermost call to the innermost helper).
    chains = []
    j = 0
    for i in range(n_ins):
        while j + 1 < len(rows) and rows[j + 1][0] <= 16 * i:
            j += 1
        chains.append(chain(j))

    def own_line(c):
        # The first frame in the K loop's lines (helpers of the file, e.g. PipeState, count at the
        # loop line that called them), else the first frame in the file, else None.
        mine = [ln for f, ln in c if f.endswith(args.file)]
        return next((ln for ln in mine if lo <= ln <= hi), mine[0] if mine else None)

    def in_ptx_wait(c):
        return any(f.endswith("sm90_ptx.cuh") and 77 <= ln <= 86 for f, ln in c)

    lines = [own_line(c) for c in chains]
    # Head: the try_wait of the K loop's mbar_wait, then back over the instructions of that call.
    waits = [i for i in range(n_ins) if lines[i] == args.wait and in_ptx_wait(chains[i]) and
             not (i > 0 and lines[i - 1] == args.wait and in_ptx_wait(chains[i - 1]))]
    waits = [i for k, i in enumerate(waits) if k == 0 or i - waits[k - 1] > 8]
    if args.nth >= len(waits):
        sys.exit(f"{len(waits)} K loops found, --nth {args.nth}")
    tw = waits[args.nth]
    head = tw
    while head > 0 and lines[head - 1] == args.wait:
        head -= 1
    # Tail: forward until the first instruction of a --stop line (the tile loop's step, the code
    # after the loops): the back edge is the instruction before it.
    stop = [tuple(int(x) for x in part.split("-")) for part in args.stop.split(",")]
    tail = head
    while tail + 1 < n_ins and not (lines[tail + 1] is not None and
                                    any(a <= lines[tail + 1] <= b for a, b in stop)):
        tail += 1
    body = range(head, tail + 1)
    print(f"{kernel[:90]}...: {n_ins} instructions; K loop [0x{16 * head:x} .. 0x{16 * tail:x}]: "
          f"{len(body)}")
    names = opcode_names(data, secs, args.names) if args.names else None

    def mnemonic(i):
        if names is None:
            return ""
        lo = struct.unpack_from("<Q", data, text["off"] + 16 * i)[0]
        return names.get(lo & 0xFFF, f"?{lo & 0xFFF:03x}")

    if args.dump:
        for i in body:
            print(f"  0x{16 * i:05x} {mnemonic(i):10s} " +
                  " <- ".join(f"{f.split('/')[-1]}:{ln}" for f, ln in chains[i]))
    if names is not None:
        count = collections.Counter(mnemonic(i) for i in body)
        print("  " + ", ".join(f"{m} {n}" for m, n in count.most_common()))
    for g in args.group:
        name, spec = g.split("=")
        ranges = [tuple(int(x) for x in part.split("-")) for part in spec.split(",")]
        n = sum(1 for i in body if any(
            f.endswith(args.file) and any(a <= ln <= b for a, b in ranges) for f, ln in chains[i]))
        print(f"  {name}: {n}")


if __name__ == "__main__":
    main()
