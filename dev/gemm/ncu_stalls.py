"""Reads an ncu source page (`ncu -i REP --page source --print-source sass --csv`, plain or .gz)
and prints the stall reasons summed per opcode, the instructions with the most samples, and the
SASS with per-instruction samples (--listing). Usage: python3 dev/gemm/ncu_stalls.py FILE [N]."""
import collections
import sys

from ncu_page import SourcePage

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 25
page = SourcePage(path)
col, stalls, instrs, base = page.col, page.stalls, page.instrs, page.base
total = sum(int(r[col["Warp Stall Sampling (All Samples)"]] or 0) for r in instrs)
print(page.title[:100], f"| {len(instrs)} instructions, {total} samples")
by_op = collections.defaultdict(collections.Counter)
for r in instrs:
    words = r[1].split()
    op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
    for h in stalls:
        by_op[h][op] += int(r[col[h]] or 0)
for h in sorted(stalls, key=lambda h: -sum(by_op[h].values())):
    n = sum(by_op[h].values())
    if n:
        print(f"{h:22} {n:7} ({100 * n / total:4.1f}%)  " + ", ".join(f"{o} {c}" for o, c in by_op[h].most_common(4)))
print("top instructions (offset, executions, samples, instruction, main stalls):")
key = lambda r: -int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
for r in sorted(instrs, key=key)[:top]:
    st = sorted(((int(r[col[h]] or 0), h[6:]) for h in stalls), reverse=True)[:3]
    print(f"{int(r[0], 16) - base:6x} {r[col['Instructions Executed']]:>7} "
          f"{r[col['Warp Stall Sampling (All Samples)']]:>6} {r[1].strip()[:58]:58} "
          + " ".join(f"{n}:{c}" for c, n in st if c))
if "--listing" in sys.argv:
    for r in instrs:
        print(f"{int(r[0], 16) - base:6x} {r[col['Instructions Executed']]:>7} "
              f"{r[col['Warp Stall Sampling (All Samples)']]:>6} {r[1].strip()[:70]}")
