"""Table of dev/gemm/ab_multi.sh: per M=4096 dense row, each variant's time per round and its
speed-up over base, raw and normalised by the same process's cuBLASLt blockwise time.
Usage: python3 dev/gemm/ab_multi_table.py DIR (holding ab_<variant>_<round>.jsonl)."""
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

d = Path(sys.argv[1])
runs = defaultdict(dict)  # variant -> round -> rows
for p in sorted(d.glob("ab_*_*.jsonl")):
    m = re.match(r"ab_(.+)_(\d+)\.jsonl", p.name)
    rows = {}
    for line in p.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "dense" or r["m"] != 4096:
            continue
        tile = r.get("tile", "") if r["impl"] == "fp8moe_forced_tile" else ""
        rows[(r["impl"], r["n"], r["k"], tile)] = r
    runs[m.group(1)][int(m.group(2))] = rows
if "base" not in runs:
    sys.exit("no base runs")
variants = [v for v in runs if v != "base"]
rounds = sorted(runs["base"])
keys = [k for k in runs["base"][rounds[0]] if k[0] in ("fp8moe", "fp8moe_forced_tile")]
print(f"{'row':<42}" + "".join(f"{v + ' raw/norm':>18}" for v in variants) + "   us per round (variants..., base)")
for key in keys:
    line = f"{key[0].replace('fp8moe_forced_tile', 'forced')} {key[1]}x{key[2]} {key[3]}"[:42]
    out = f"{line:<42}"
    detail = []
    for v in variants + ["base"]:
        us = [runs[v][r].get(key, {}).get("us", 0) for r in rounds if r in runs[v]]
        detail.append("/".join(f"{u:.0f}" for u in us))
    for v in variants:
        try:
            raw = sum(runs["base"][r][key]["us"] for r in rounds) / sum(runs[v][r][key]["us"] for r in rounds)
            blk = ("cublaslt_fp8_blockwise", key[1], key[2], "")
            norm = sum(runs["base"][r][key]["us"] / runs["base"][r][blk]["us"] for r in rounds) / sum(
                runs[v][r][key]["us"] / runs[v][r][blk]["us"] for r in rounds)
            out += f"{raw:9.3f}{norm:9.3f}"
        except (KeyError, ZeroDivisionError):
            out += f"{'-':>18}"
    print(out + "   " + "  ".join(detail))
print("ours / cuBLASLt blockwise (same process), mean over rounds:")
for v in variants + ["base"]:
    parts = []
    for key in keys:
        if key[0] != "fp8moe" and key[3] not in ("128x128/direct", "128x128/tma_store"):
            continue
        rs = [runs[v][r][key].get("ratio_vs_cublaslt_blockwise", 0) for r in rounds if key in runs[v].get(r, {})]
        if rs:
            parts.append(f"{key[1]}x{key[2]}{'' if key[0] == 'fp8moe' else ' ' + key[3].split('/')[1]}={sum(rs) / len(rs):.3f}")
    print(f"  {v}: " + ", ".join(parts))
