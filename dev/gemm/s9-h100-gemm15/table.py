#!/usr/bin/env python3
"""gemm15 / session 9: per gemm_bench file and dense shape, the heuristic's pick, the plain
256x128 rows (forced as the sweep does, and with pdl named: the same kernel twice, the noise
gauge), 256x128 with the K loop unrolled over the stages (unroll_k), 128x256 plain and unrolled,
and cuBLASLt blockwise, each as us / TFLOPS / SM MHz / W, and the ratios plain / unrolled (> 1:
the unrolled loop faster). Usage: table.py FILE.jsonl [FILE.jsonl ...]"""
import json
import os
import sys

W = '256x128x128/s0/sm0/tma_store'
W_Q = W + '/pdl'
W_U = W_Q + '/unrollk'
N_Q = '128x256x128/s0/sm0/tma_store/pdl'
N_U = N_Q + '/unrollk'


def cell(x):
    if x is None:
        return '-'
    return (f"{x['us']:.1f} / {x['tflops']:.0f} / {x.get('sm_mhz', float('nan')):.0f} / "
            f"{x.get('power_w', float('nan')):.0f}")


def ratio(a, b):
    return f"{a['us'] / b['us']:.3f}" if a and b else '-'


print('| file | M x N x K | pick (tile) | 256x128 | 256x128 (pdl named) | 256x128 unrolled '
      '| 128x256 | 128x256 unrolled | cuBLASLt blockwise | 256x128 / unrolled '
      '| 256x128 (named) / unrolled | 128x256 / unrolled | pick / 256x128 unrolled |')
print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if r.get('kind') == 'dense']
    shapes = []
    for r in rows:
        if (r['m'], r['n'], r['k']) not in shapes:
            shapes.append((r['m'], r['n'], r['k']))
    for s in shapes:
        rs = [r for r in rows if (r['m'], r['n'], r['k']) == s]
        get = lambda impl, tile=None: next(
            (r for r in rs if r['impl'] == impl and (tile is None or r.get('tile') == tile)), None)
        pick = get('fp8moe')
        w, wq, wu = (get('fp8moe_forced_tile', t) for t in (W, W_Q, W_U))
        nq, nu = get('fp8moe_forced_tile', N_Q), get('fp8moe_forced_tile', N_U)
        lt = get('cublaslt_fp8_blockwise')
        pick_s = f"{cell(pick)} ({pick.get('tile', '')})" if pick else '-'
        print(f"| {os.path.basename(path)} | {s[0]} x {s[1]} x {s[2]} | {pick_s} | {cell(w)} "
              f"| {cell(wq)} | {cell(wu)} | {cell(nq)} | {cell(nu)} | {cell(lt)} "
              f"| {ratio(w, wu)} | {ratio(wq, wu)} | {ratio(nq, nu)} | {ratio(pick, wu)} |")
print()
print('(cells: us / TFLOPS / SM MHz / W, the bench row\'s medians; ratios of us, > 1: the second '
      'faster)')
