"""Session 8 (gemm11): the wgrad rows of several builds side by side, per shape and row.
Usage: python3 summary.py DIR (files DIR/<build>_r<round>.jsonl)."""
import collections, glob, json, os, sys

d = sys.argv[1]
rows = collections.defaultdict(list)  # (shape, build, row) -> [(round, us, mhz)]
anchor = collections.defaultdict(list)
builds = []
for f in sorted(glob.glob(os.path.join(d, "*_r*.jsonl"))):
    name = os.path.basename(f)[:-6]
    build, rnd = name.rsplit("_r", 1)
    if build not in builds:
        builds.append(build)
    for line in open(f):
        r = json.loads(line)
        shape = f"{r['kind'][:8]} {r['m']}x{r['n']}x{r['k']} g{r['groups']}"
        if r["impl"].startswith("cublaslt"):
            anchor[shape].append(r["us"])
            continue
        tag = "pick" if r["impl"] == "fp8moe" else r["tile"].replace("128x128x128/", "").replace("/sm0", "")
        extra = "" if r.get("rel_diff_vs_pick", 0.0) in (0.0, None) else f" DIFF {r['rel_diff_vs_pick']:.1e}"
        rows[(shape, build, tag)].append(f"{r['us']:.1f}{extra}")
for shape in dict.fromkeys(k[0] for k in rows):
    a = sorted(anchor[shape])
    print(f"{shape}: cuBLASLt per-tensor {' / '.join(f'{x:.1f}' for x in a)} us")
    for (s, b, t), v in rows.items():
        if s != shape:
            continue
        us = [float(x.split()[0]) for x in v]
        ratio = (sum(a) / len(a)) / (sum(us) / len(us)) if a else 0
        print(f"  {b:8} {t:32} {' / '.join(v):28} ratio {ratio:.3f}")
