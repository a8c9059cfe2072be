#!/usr/bin/env python3
"""gemm16 / session 10: the stage-wait placements beside the plain wide kernels, per gemm_bench
file and shape. Dense: the heuristic's pick, 256x128 forced as the sweep does and with pdl named
(the same kernel twice: the noise gauge), 256x128 t (stage_wait 1, the wait at the top of each K
block) and r (stage_wait 2, release before the look-ahead), 128x256 plain / t / r, cuBLASLt
blockwise. Grouped contiguous: the pick and 128x256 plain / t / r. Cells us / TFLOPS / SM MHz / W;
ratios plain us / variant us (> 1: the variant faster).
Usage: table.py FILE.jsonl [FILE.jsonl ...]"""
import json
import os
import sys

W = '256x128x128/s0/sm0/tma_store'
W_Q = W + '/pdl'
N_Q = '128x256x128/s0/sm0/tma_store/pdl'


def cell(x):
    if x is None:
        return '-'
    return (f"{x['us']:.1f} / {x['tflops']:.0f} / {x.get('sm_mhz', float('nan')):.0f} / "
            f"{x.get('power_w', float('nan')):.0f}")


def ratio(a, b):
    return f"{a['us'] / b['us']:.3f}" if a and b and a.get('us') and b.get('us') else '-'


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def shapes_of(rows):
    out = []
    for r in rows:
        s = (r['m'], r['n'], r['k'], r.get('groups', 1))
        if s not in out:
            out.append(s)
    return out


def getter(rs):
    return lambda impl, tile=None: next(
        (r for r in rs if r['impl'] == impl and (tile is None or r.get('tile') == tile)), None)


dense, grouped = [], []
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    rows = load(path)
    name = os.path.basename(path)
    for s in shapes_of([r for r in rows if r.get('kind') == 'dense']):
        get = getter([r for r in rows if r.get('kind') == 'dense' and
                      (r['m'], r['n'], r['k'], r.get('groups', 1)) == s])
        dense.append((name, s, get))
    for s in shapes_of([r for r in rows if r.get('kind') == 'grouped_contiguous']):
        get = getter([r for r in rows if r.get('kind') == 'grouped_contiguous' and
                      (r['m'], r['n'], r['k'], r.get('groups', 1)) == s])
        grouped.append((name, s, get))

if dense:
    print('| file | M x N x K | pick (tile) | 256x128 | 256x128 (pdl named) | 256x128 t | 256x128 r '
          '| 128x256 | 128x256 t | 128x256 r | cuBLASLt blockwise | 256x128 / (pdl named) '
          '| 256x128 / t | 256x128 / r | 128x256 / t | 128x256 / r |')
    print('| --- ' * 16 + '|')
    for name, s, get in dense:
        pick = get('fp8moe')
        w, wq, wt, wr = (get('fp8moe_forced_tile', t) for t in (W, W_Q, W_Q + '/waittop',
                                                                 W_Q + '/relfirst'))
        nq, nt, nr = (get('fp8moe_forced_tile', t) for t in (N_Q, N_Q + '/waittop',
                                                              N_Q + '/relfirst'))
        lt = get('cublaslt_fp8_blockwise')
        pick_s = f"{cell(pick)} ({pick.get('tile', '')})" if pick else '-'
        print(f"| {name} | {s[0]} x {s[1]} x {s[2]} | {pick_s} | {cell(w)} | {cell(wq)} "
              f"| {cell(wt)} | {cell(wr)} | {cell(nq)} | {cell(nt)} | {cell(nr)} | {cell(lt)} "
              f"| {ratio(w, wq)} | {ratio(wq, wt)} | {ratio(wq, wr)} | {ratio(nq, nt)} "
              f"| {ratio(nq, nr)} |")
    print()
if grouped:
    print('| file | groups x rows, N x K | pick (tile) | 128x256 | 128x256 t | 128x256 r '
          '| 128x256 / t | 128x256 / r | pick / 128x256 (pdl named) |')
    print('| --- ' * 9 + '|')
    for name, s, get in grouped:
        pick = get('fp8moe')
        nq, nt, nr = (get('fp8moe_forced_tile', t) for t in (N_Q, N_Q + '/waittop',
                                                              N_Q + '/relfirst'))
        pick_s = f"{cell(pick)} ({pick.get('tile', '')})" if pick else '-'
        print(f"| {name} | {s[3]} x {s[0] // max(s[3], 1)}, {s[1]} x {s[2]} | {pick_s} "
              f"| {cell(nq)} | {cell(nt)} | {cell(nr)} | {ratio(nq, nt)} | {ratio(nq, nr)} "
              f"| {ratio(pick, nq)} |")
    print()
print('(cells: us / TFLOPS / SM MHz / W, the bench row\'s medians; ratios of us, > 1: the second '
      'faster)')
