#!/usr/bin/env python3
"""DeepGEMM beside ours, per shape, from one call's rows: DeepGEMM's dg_bench.py rows (us per way,
and the NVML median of each phase through phase_summary.py's attribution) and our gemm_bench rows
(the heuristic's pick 'fp8moe' and cuBLASLt blockwise; plain = graph replays under load, flush8g
= FP8MOE_BENCH_FLUSH_L2=8000). Usage: table.py DIR (a call's unpacked g13 folder)."""
import csv
import json
import os
import statistics
import sys

d = sys.argv[1]
nvml = list(csv.DictReader(open(os.path.join(d, 'nvml.csv'))))


def mhz(t0, t1):
    s = [int(x['mhz']) for x in nvml if t0 <= float(x['t']) <= t1]
    return statistics.median(s) if s else float('nan')


dg = {}
for name in ('dg_rows.jsonl',):
    p = os.path.join(d, name)
    if os.path.exists(p):
        for line in open(p):
            r = json.loads(line)
            dg.setdefault((r['n'], r['k']), {})[r['phase']] = (r['us'], r['tflops'], mhz(r['t0'], r['t1']))
ours = {}
for mode, name in (('plain', 'ours_plain.jsonl'), ('flush8g', 'ours_flush8g.jsonl')):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        continue
    for line in open(p):
        r = json.loads(line)
        if r.get('kind') != 'dense' or r['impl'] not in ('fp8moe', 'cublaslt_fp8_blockwise'):
            continue
        ours.setdefault((r['n'], r['k']), {})[(mode, r['impl'])] = (r['us'], r['tflops'], r.get('sm_mhz', float('nan')))


def cell(v):
    return f'{v[0]:.1f} / {v[1]:.0f} / {v[2]:.0f}' if v else '-'


ways = ['kineto_flush8g', 'flush8g_events', 'kineto_noflush', 'b2b']
cols = ['DG ' + w for w in ways] + ['ours flush8g', 'ours plain', 'cuBLASLt plain']
print('| 4096 x N x K | ' + ' | '.join(cols) + ' |')
print('| --- ' * (len(cols) + 1) + '|')
for key in sorted(set(dg) | set(ours), key=lambda x: -x[1]):
    g, o = dg.get(key, {}), ours.get(key, {})
    vals = [g.get(w) for w in ways] + [o.get(('flush8g', 'fp8moe')), o.get(('plain', 'fp8moe')),
                                       o.get(('plain', 'cublaslt_fp8_blockwise'))]
    print(f'| {key[0]} x {key[1]} | ' + ' | '.join(cell(v) for v in vals) + ' |')
print('(each cell: us / TFLOPS / SM MHz; DeepGEMM MHz = NVML median over the phase, ours = the '
      'bench row\'s NVML median)')
