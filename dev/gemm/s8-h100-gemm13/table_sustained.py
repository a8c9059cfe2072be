#!/usr/bin/env python3
"""Call 3's sustained table: per round and shape, DeepGEMM's graph replays after 3 s without pause
(dg_bench.py --sustained; SM clock / power = NVML medians over the phase) beside our gemm_bench
plain rows of the same round (the pick, 256x128 forced, cuBLASLt blockwise; the row's NVML
medians). Then the forced rows of ours_2112_192.jsonl. Usage: table_sustained.py DIR."""
import csv
import glob
import json
import os
import re
import statistics
import sys

d = sys.argv[1]
nvml = list(csv.DictReader(open(os.path.join(d, 'nvml.csv'))))


def med(t0, t1, key):
    s = [float(x[key]) for x in nvml if t0 <= float(x['t']) <= t1]
    return statistics.median(s) if s else float('nan')


dg = [json.loads(line) for line in open(os.path.join(d, 'dg_rows.jsonl'))]
seen = {}
print('| round | 4096 x N x K | DeepGEMM sustained | ours pick | ours 256x128 forced | cuBLASLt blockwise | DeepGEMM / ours pick |')
print('| --- | --- | --- | --- | --- | --- | --- |')
for r in dg:
    key = (r['n'], r['k'])
    seen[key] = seen.get(key, 0) + 1
    rnd = seen[key]
    p = os.path.join(d, f'ours_4096x{r["n"]}x{r["k"]}.{rnd}.jsonl')
    rows = [json.loads(line) for line in open(p)] if os.path.exists(p) else []
    pick = next((x for x in rows if x['impl'] == 'fp8moe'), None)
    forced = next((x for x in rows if x['impl'] == 'fp8moe_forced_tile' and x['tile'].startswith('256x128') and 'tail' not in x['tile']), None)
    lt = next((x for x in rows if x['impl'] == 'cublaslt_fp8_blockwise'), None)
    f = lambda x: f"{x['us']:.1f} us / {x['tflops']:.0f} / {x.get('sm_mhz', float('nan')):.0f} MHz / {x.get('power_w', float('nan')):.0f} W" if x else '-'
    dgc = f"{r['us']:.1f} us / {r['tflops']:.0f} / {med(r['t0'], r['t1'], 'mhz'):.0f} MHz / {med(r['t0'], r['t1'], 'w_avg'):.0f} W"
    ratio = f"{pick['us'] / r['us']:.3f}" if pick else '-'
    print(f"| {rnd} | {r['n']} x {r['k']} | {dgc} | {f(pick)} | {f(forced)} | {f(lt)} | {ratio} |")
p = os.path.join(d, 'ours_2112_192.jsonl')
if os.path.exists(p):
    print()
    print('| 4096 x 2112 x 7168 row | tile | us | TFLOPS | SM MHz |')
    print('| --- | --- | --- | --- | --- |')
    for line in open(p):
        x = json.loads(line)
        if x.get('kind') == 'dense':
            print(f"| {x['impl']} | {x.get('tile', '')} | {x['us']:.1f} | {x['tflops']:.0f} | {x.get('sm_mhz', float('nan')):.0f} |")
