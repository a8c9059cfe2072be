#!/usr/bin/env python3
"""gemm14 / session 9 call 1: per gemm_bench file and dense shape, the heuristic's pick, the
single-CTA 256x128 rows (forced as the plain sweep does, and with pdl named: the same kernel
twice, a noise gauge), the pairs-along-N row (pair_n, A multicast), the B-scales-in-shared-memory
rows (scale_smem: single, and with the pairs) and cuBLASLt blockwise, each as
us / TFLOPS / SM MHz / W, and the ratios single / variant (> 1: the variant faster).
Usage: table.py FILE.jsonl [FILE.jsonl ...]"""
import json
import os
import sys

SINGLE = '256x128x128/s0/sm0/tma_store'
SINGLE_Q = SINGLE + '/pdl'
PAIR_N = SINGLE + '/pairN/pdl'
SMEM = SINGLE_Q + '/sbsmem'
PAIR_N_SMEM = PAIR_N + '/sbsmem'


def cell(x):
    if x is None:
        return '-'
    return (f"{x['us']:.1f} / {x['tflops']:.0f} / {x.get('sm_mhz', float('nan')):.0f} / "
            f"{x.get('power_w', float('nan')):.0f}")


print('| file | M x N x K | pick (tile) | 256x128 single | 256x128 single (pdl named) '
      '| 256x128 pairN | 256x128 sbsmem | 256x128 pairN sbsmem | cuBLASLt blockwise '
      '| single / pairN | single / sbsmem | single / pairN sbsmem | pick / pairN |')
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
        single = get('fp8moe_forced_tile', SINGLE)
        single_q = get('fp8moe_forced_tile', SINGLE_Q)
        pair = get('fp8moe_forced_tile', PAIR_N)
        smem = get('fp8moe_forced_tile', SMEM)
        pair_smem = get('fp8moe_forced_tile', PAIR_N_SMEM)
        lt = get('cublaslt_fp8_blockwise')
        ratio = lambda x: f"{single_q['us'] / x['us']:.3f}" if single_q and x else '-'
        ratio_pick = f"{pick['us'] / pair['us']:.3f}" if pick and pair else '-'
        pick_s = f"{cell(pick)} ({pick.get('tile', '')})" if pick else '-'
        print(f"| {os.path.basename(path)} | {s[0]} x {s[1]} x {s[2]} | {pick_s} | {cell(single)} "
              f"| {cell(single_q)} | {cell(pair)} | {cell(smem)} | {cell(pair_smem)} | {cell(lt)} "
              f"| {ratio(pair)} | {ratio(smem)} | {ratio(pair_smem)} | {ratio_pick} |")
print()
print('(cells: us / TFLOPS / SM MHz / W, the bench row\'s medians)')
