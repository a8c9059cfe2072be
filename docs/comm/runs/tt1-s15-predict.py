#!/usr/bin/env python3
"""test_comm_gpu's per-test times with tt1's host case cache, predicted from a run's logs.

Each log is one process (a gtest shard); the cache lives per process. A harness whose key (case,
payload: the seed and config follow from them) was made earlier in the same process saves
s * (memo_ms - copy_cmp_ms) of tt1-s15-host-costs.txt (this machine, best of 3; s = the device
host's time for one ms here). With --new, the measured times of the patched run beside them.

  python3 docs/comm/runs/tt1-s15-predict.py [--s 1.0] [--top 25] OLD_SHARD0.log [OLD_SHARD1.log]
      [--new NEW_SHARD0.log [NEW_SHARD1.log]]
"""
import argparse
import os
import re

ap = argparse.ArgumentParser()
ap.add_argument('logs', nargs='+')
ap.add_argument('--new', nargs='+', default=[])
ap.add_argument('--s', type=float, default=1.0)
ap.add_argument('--top', type=int, default=25)
ap.add_argument('--fit', action='store_true',
                help='least squares of the old times over the NvlinkTest sweeps: ms = a * host ms '
                'here (every harness) + b * NCCL harnesses')
args = ap.parse_args()

cost = {}
for line in open(os.path.join(os.path.dirname(__file__), 'tt1-s15-host-costs.txt')):
    f = line.split()
    if len(f) == 12 and f[1] in ('bf16', 'fp8'):
        cost[(f[0], f[1])] = (float(f[9]), float(f[10]), float(f[11]))
# Harnesses that print no case line (graph replays, overflow, the in-pieces tests): their keys.
G, O = ('graph_replays', 'fp8'), ('overflow', 'fp8')
L2, L4 = ('ll_graph_R2', 'fp8'), ('ll_graph_R4', 'fp8')
manual = {
    'NvlinkTest.GraphCapturedRoundReplays': [G] * 10,
    'NvlinkTest.Session13BulkRowsGraphCapturedRoundReplays': [G] * 2,
    'NvlinkTest.Session13LateRecvBulkGraphCapturedRoundReplays': [G] * 3,
    'NvlinkTest.Session14TokenSlotsGraphCapturedRoundReplays': [G] * 2,
    'NvlinkTest.Session15PayloadClaimsGraphCapturedRoundReplays': [G] * 2,
    'NvlinkTest.Session15CombineChunkGraphCapturedRoundReplays': [G] * 4,
    'NvlinkTest.OverflowIsReported': [O] * 5,
    'NvlinkTest.Session13LateRecvBulkOverflowIsReported': [O] * 2,
    'NvlinkTest.Session14TokenSlotsOverflowIsReported': [O] * 2,
    'NvlinkTest.Session15PayloadClaimsOverflowIsReported': [O] * 2,
    'NvlinkTest.Session13BulkRowsInPiecesMatchReference':
        [('bulk_pieces_%d' % h, 'fp8') for h in (7296, 14336, 7680) for _ in (0, 1)],
    'NvlinkTest.Session13LateRecvBulkInPiecesMatchReference':
        [('recv_pieces_%d' % h, p) for p in ('fp8', 'bf16') for h in (7168, 7296, 14336)
         for _ in range(4)],
    'NvlinkTest.LowLatencyGraphCapturedRoundReplays': [L2, L2, L4] + [L2, L4] * 3,
    'NvlinkTest.LowLatencyGraphCapturedRoundReplaysRotated': [L2, L4, L4] * 3,
}


def parse(fn):
    tests, cur = [], None
    for line in open(fn):
        m = re.match(r'\[ RUN      \] (\S+)', line)
        if m:
            cur = {'name': m.group(1), 'keys': list(manual.get(m.group(1), []))}
            tests.append(cur)
            continue
        m = re.match(r'\[       OK \] (\S+) \((\d+) ms\)', line)
        if m and cur:
            cur['ms'] = int(m.group(2))
            continue
        m = re.match(r'  \.\. case (\S+) (bf16|fp8) (\S+)', line)
        if m and cur and cur['name'].startswith('NvlinkTest.') and (m.group(1), m.group(2)) in cost:
            cur['keys'].append((m.group(1), m.group(2)))
            cur['nccl'] = cur.get('nccl', 0) + (m.group(3) == 'nccl')
    return [t for t in tests if 'ms' in t]


if args.fit:
    def solve(rows, ys):  # normal equations, Gauss-Jordan
        n = len(rows[0])
        m = [[sum(r[i] * r[j] for r in rows) for j in range(n)] +
             [sum(r[i] * y for r, y in zip(rows, ys))] for i in range(n)]
        for i in range(n):
            p = max(range(i, n), key=lambda k: abs(m[k][i]))
            m[i], m[p] = m[p], m[i]
            for k in range(n):
                if k != i:
                    f = m[k][i] / m[i][i]
                    m[k] = [u - f * v for u, v in zip(m[k], m[i])]
        return [m[i][n] / m[i][i] for i in range(n)]
    pts, ys = [], []
    for fn in args.logs:
        for t in parse(fn):
            if t['name'].startswith('NvlinkTest.') and len(t['keys']) >= 11 and t['name'] not in manual:
                pts.append((sum(cost[k][0] for k in t['keys']), t.get('nccl', 0),
                            len(t['keys']) - t.get('nccl', 0)))
                ys.append(t['ms'])
    for cols in ((0, 1), (0, 1, 2)):
        rows = [[p[c] for c in cols] for p in pts]
        x = solve(rows, ys)
        rms = (sum((sum(u * v for u, v in zip(r, x)) - y) ** 2 for r, y in zip(rows, ys)) /
               len(ys)) ** 0.5
        print('fit over %d sweep tests: ms = %.2f * host ms here + %.0f ms * NCCL harnesses%s '
              '(rms %.0f ms)' % (len(ys), x[0], x[1],
                                 ' + %.1f ms * NVLink harnesses' % x[2] if len(x) > 2 else '', rms))
measured = {}
for fn in args.new:
    for t in parse(fn):
        measured[t['name']] = t['ms']
rows = []
for shard, fn in enumerate(args.logs):
    seen, mb, make_ms = set(), 0.0, 0.0
    for t in parse(fn):
        saved = reuse = 0
        for k in t['keys']:
            if k in seen:
                saved += args.s * (cost[k][0] - cost[k][1])
                reuse += 1
            else:
                seen.add(k)
                mb += cost[k][2]
                make_ms += cost[k][0]
        rows.append((t['name'], shard, t['ms'], t['ms'] - saved, len(t['keys']), reuse,
                     measured.get(t['name'])))
    old = sum(r[2] for r in rows if r[1] == shard) / 1e3
    new = sum(r[3] for r in rows if r[1] == shard) / 1e3
    got = sum(r[6] or 0 for r in rows if r[1] == shard) / 1e3
    print('process %d (%s): %.1f s -> predicted %.1f s%s; %d cases made (%.0f ms here: the cache\'s'
          ' exit line over this is s), ~%.0f MB' %
          (shard, os.path.basename(fn), old, new, ', measured %.1f s' % got if args.new else '',
           len(seen), make_ms, mb))
print('total at s = %.2f: %.1f s -> predicted %.1f s%s' %
      (args.s, sum(r[2] for r in rows) / 1e3, sum(r[3] for r in rows) / 1e3,
       ', measured %.1f s' % (sum(r[6] or 0 for r in rows) / 1e3) if args.new else ''))
print()
print('| test | process | old ms | predicted ms | harnesses | reused |%s' %
      (' measured ms |' if args.new else ''))
print('|---|---:|---:|---:|---:|---:|%s' % ('---:|' if args.new else ''))
for r in sorted(rows, key=lambda r: -r[2])[:args.top]:
    print('| %s | %d | %d | %.0f | %d | %d |%s' %
          (r[0].replace('NvlinkTest.', ''), r[1], r[2], r[3], r[4], r[5],
           (' %s |' % r[6]) if args.new else ''))
