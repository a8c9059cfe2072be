#!/usr/bin/env python3
"""Attributes the NVML sampler's rows (nvml_sampler.py) to the phases of a run (JSON lines with
'phase', 't0', 't1' from dg_bench.py and run.sh) and prints, per phase: the timing, the median
SM clock, instant and average power, and the share of samples with the software power cap
(clock-event reason 0x4) set."""
import csv
import json
import statistics
import sys

samples = list(csv.DictReader(open(sys.argv[1])))
for line in open(sys.argv[2]):
    line = line.strip()
    if not line.startswith('{'):
        continue
    r = json.loads(line)
    if 'phase' not in r:
        continue
    s = [x for x in samples if r['t0'] <= float(x['t']) <= r['t1']]
    if not s:
        continue
    mhz = statistics.median(int(x['mhz']) for x in s)
    wi = statistics.median(float(x['w_inst']) for x in s)
    wa = statistics.median(float(x['w_avg']) for x in s)
    cap = sum(1 for x in s if int(x['reasons'], 16) & 0x4) / len(s)
    shape = f"{r.get('m', '')}x{r.get('n', '')}x{r.get('k', '')}" if 'm' in r else r.get('shape', '')
    t = f"{r['us']:8.1f} us {r['tflops']:7.1f} TFLOPS" if 'us' in r else ' ' * 30
    print(f"{r['phase']:22s} {shape:18s} {t}  {mhz:6.0f} MHz  {wi:5.0f} W inst  {wa:5.0f} W avg  "
          f"pwrcap {cap * 100:3.0f}%  n={len(s)}  {r['t1'] - r['t0']:.2f} s")
