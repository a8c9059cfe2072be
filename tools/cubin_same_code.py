#!/usr/bin/env python3
"""Checks that a refactor left the machine code alone: every function's code section (.text.<name>)
of an sm_90a cubin before is byte for byte the one after, and no function came or went. The
bytes are what the GPU runs, so a change whose cubins compare equal here needs no device run to
be trusted. It complements tools/ptx_same_functions.py: PTX that differs only in its virtual
register numbering may still assemble to the same bytes, and this says whether it did. Works
without cuobjdump or a GPU (reads the ELF section table itself).

Make the cubins with the build's own nvcc command (ninja -t commands <target> in the build
folder), its "-c SRC -o OBJ" replaced by "-cubin SRC -o OUT.cubin" (and -MD/-MT/-MF dropped):
  cmd=$(ninja -t commands fp8moe_comm | grep -- '-c .*/sm90_device_ep_ll.cu ' |
        sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -c ([^ ]+) -o [^ ]+$/ -cubin \\1 -o after.cubin/')
  eval "$cmd"
Usage: python3 tools/cubin_same_code.py before.cubin after.cubin
Exit status 0 when every function's code matches, 1 otherwise (the differing functions listed)."""

import struct
import sys


def code_sections(path):
    """{section name: bytes} of the ELF64 file's .text.* sections."""
    data = open(path, "rb").read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        sys.exit(f"{path}: not an ELF64 file (a cubin made with nvcc -cubin?)")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, offset, size))
    names_at = headers[shstrndx][1]

    def name_of(offset):
        start = names_at + offset
        return data[start:data.index(b"\0", start)].decode()

    out = {}
    for name, offset, size in headers:
        section = name_of(name)
        if section.startswith(".text."):
            out[section] = data[offset:offset + size]
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    before, after = code_sections(sys.argv[1]), code_sections(sys.argv[2])
    differ = 0
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section), after.get(section)
        if a == b:
            continue
        differ += 1
        what = "only before" if b is None else "only after" if a is None else f"{len(a)} -> {len(b)} bytes"
        print(f"DIFFERS  {section[6:]}  ({what})")
    print(f"{len(set(before) | set(after))} functions compared: "
          + ("all identical" if differ == 0 else f"{differ} differences"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
