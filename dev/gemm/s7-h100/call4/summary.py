"""Prints gemm_bench jsonl rows compactly: shape, impl, tile, us, ratio to cuBLASLt blockwise,
TFLOPS, SM clock, power. Usage: python3 summary.py FILE.jsonl [...]"""
import json
import sys

for path in sys.argv[1:]:
    try:
        rows = [json.loads(l) for l in open(path) if l.strip()]
    except OSError as e:
        print(path, e)
        continue
    print(f"== {path}")
    for r in rows:
        shape = f"{r['kind'][:10]} g{r['groups']} {r['m']}x{r['n']}x{r['k']}"
        ratio = r.get("ratio_vs_cublaslt_blockwise")
        print(f"{shape:34} {r['impl'][:22]:22} {r.get('tile', '')[:38]:38} {r['us']:9.1f} us "
              f"{(f'x{ratio:.3f}' if ratio else ''):7} {r['tflops']:7.1f} TF "
              f"{r.get('sm_mhz', 0):5.0f} MHz {r.get('power_w', 0):4.0f} W {r.get('note', '')}")
