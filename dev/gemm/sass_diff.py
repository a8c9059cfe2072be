"""Checks a SASS patch (tools/sass_interleave.cpp) on the device: diffs `cuobjdump -sass` of the
unpatched and the patched binary instruction by instruction and fails unless every changed
instruction is an FFMA whose low word is unchanged and whose high word differs only in the yield
bit (45) and the reuse bits (58-61), and every run of changed FFMAs follows a wgmma wait
(WARPGROUP.DEPBAR) within 160 instructions (the promotion: up to 64 FFMAs a thread, interleaved
with the next block's issue).
Usage: python3 dev/gemm/sass_diff.py BASE.sass PATCHED.sass (exit 1 on any violation)."""
import re
import sys

INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* (0x[0-9a-f]{16}) \*/")
HI = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")
MASK = (1 << 45) | (0xF << 58)


def parse(path):
    funcs, cur = [], None
    lines = open(path).read().splitlines()
    for i, line in enumerate(lines):
        if "Function : " in line:
            cur = (line.split("Function : ")[1].strip(), [])
            funcs.append(cur)
            continue
        m = INS.search(line)
        if m and cur is not None and i + 1 < len(lines):
            h = HI.match(lines[i + 1])
            if h:
                text = m.group(2).strip()
                cur[1].append((int(m.group(1), 16), text, int(m.group(3), 16), int(h.group(1), 16)))
    return funcs


def opname(text):
    parts = text.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def main():
    base, new = parse(sys.argv[1]), parse(sys.argv[2])
    bad = 0
    if [f[0] for f in base] != [f[0] for f in new]:
        print("function lists differ")
        return 1
    total = 0
    for (name, a), (_, b) in zip(base, new):
        if len(a) != len(b):
            print(f"{name}: instruction count differs {len(a)} vs {len(b)}")
            bad += 1
            continue
        changed = [i for i in range(len(a)) if a[i][2:] != b[i][2:]]
        if not changed:
            continue
        total += len(changed)
        runs, start = [], changed[0]
        for x, y in zip(changed, changed[1:] + [None]):
            if y is None or y - x > 5:
                runs.append((start, x))
                start = y
        y_before = sum(1 for i in changed if not (a[i][3] >> 45) & 1)
        y_after = sum(1 for i in changed if not (b[i][3] >> 45) & 1)
        for i in changed:
            if opname(a[i][1]) != "FFMA" or a[i][2] != b[i][2] or (a[i][3] ^ b[i][3]) & ~MASK:
                print(f"{name}: VIOLATION at {a[i][0]:#x}: {a[i][1]} -> {b[i][1]}")
                bad += 1
            if re.sub(r"\.reuse", "", a[i][1]) != re.sub(r"\.reuse", "", b[i][1]):
                print(f"{name}: VIOLATION (operands) at {a[i][0]:#x}")
                bad += 1
        outside = 0
        for s, e in runs:
            if not any("WARPGROUP.DEPBAR" in a[j][1] for j in range(max(0, s - 160), s + 1)):
                outside += 1
                print(f"{name}: run {a[s][0]:#x}-{a[e][0]:#x} not after a WARPGROUP.DEPBAR")
        bad += outside
        n_qgmma = sum(1 for x in a if "GMMA" in opname(x[1]))
        print(f"{name[:72]}: {len(a)} instr, {n_qgmma} QGMMA, {len(changed)} FFMAs changed in "
              f"{len(runs)} runs (yielding among them {y_before} -> {y_after}), "
              f"{len(runs) - outside} runs after a wgmma wait")
    print(f"total changed instructions: {total}, violations: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
