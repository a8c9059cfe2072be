"""Per-source-line and per-function warp-stall samples of one kernel from an ncu SASS source page.
Inputs: the page (`ncu -i REP --kernel-name regex:K --launch-count 1 --page source --print-source
sass --csv > page.csv`), `nvdisasm -g -c` of the cubin holding the kernel (same binary), the
source file as built, and a regex of the kernel's mangled name. The page's addresses, relative to
the kernel's first instruction, are the offsets nvdisasm prints; the source file gives the
enclosing function of each line (inlined code is charged to the function it is written in).
Usage: python3 scripts/comm/ncu_lines.py KERNEL.sass page.csv src.cu 'k_dispatch_sendILb0E' [N]"""
import collections
import csv
import re
import sys

sass_file, csv_file, src_file, fn_pat = sys.argv[1:5]
top = int(sys.argv[5]) if len(sys.argv) > 5 else 25
lines, cur_fn, cur_line = {}, None, None
for l in open(sass_file):
    m = re.match(r"^\.text\.(\S+):", l)
    if m:
        cur_fn = m.group(1)
        continue
    m = re.search(r'//## File ".*", line (\d+)', l)
    if m:
        cur_line = int(m.group(1))
        continue
    m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", l)
    if m and cur_fn and re.search(fn_pat, cur_fn):
        lines[int(m.group(1), 16)] = (cur_line, m.group(2).strip())
rows = list(csv.reader(open(csv_file)))
hdr = rows[1]
col = {h: i for i, h in enumerate(hdr)}
instr, seen = [], set()
for r in rows[2:]:
    if not r or not r[0].startswith("0x"):
        continue
    if r[0] in seen:  # the page repeats for the next kernel: keep the first
        break
    seen.add(r[0])
    instr.append(r)
base = int(instr[0][0], 16)
src = open(src_file).read().split("\n")
spans = []
for i, l in enumerate(src, 1):
    m = re.match(r"^(?:__device__|__global__)[^(]*?(\w+)\(", l)
    if m:
        spans.append((i, m.group(1)))


def fn_of(line):
    name = "?"
    for s, n in spans:
        if s <= line:
            name = n
    return name


stall_cols = [h for h in hdr if h.startswith("stall_") and "not issued" not in h.lower().replace("_", " ")]
by_line, by_fn = collections.Counter(), collections.Counter()
stall_fn = collections.defaultdict(collections.Counter)
mismatches = total = 0
for r in instr:
    off = int(r[0], 16) - base
    s = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
    total += s
    ln, op = lines.get(off, (None, ""))
    if op and op.split()[0].split(".")[0] not in r[1]:
        mismatches += 1
    if ln is None:
        continue
    by_line[ln] += s
    f = fn_of(ln)
    by_fn[f] += s
    for h in stall_cols:
        if r[col[h]] and r[col[h]] != "0":
            stall_fn[f][h] += int(float(r[col[h]]))
print(f"{csv_file}: {len(instr)} instructions, {total} samples, opcode mismatches {mismatches}")
print("-- by function:")
for f, s in by_fn.most_common():
    if s:
        top4 = ", ".join(f'{k.replace("stall_", "")}:{v}' for k, v in stall_fn[f].most_common(4))
        print(f"  {f:26s} {s:7d} {100 * s / total:5.1f}%  {top4}")
print("-- top lines:")
for ln, s in by_line.most_common(top):
    print(f"  {ln:5d} {s:6d} {100 * s / total:5.1f}%  [{fn_of(ln)}] {src[ln - 1].strip()[:100]}")
