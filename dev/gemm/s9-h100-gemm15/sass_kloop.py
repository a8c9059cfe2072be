#!/usr/bin/env python3
"""gemm15 / session 9: the K loops of a kernel's SASS (cuobjdump -sass -fun NAME), counted.
A K loop is a backward branch whose range [target, branch] holds QGMMA instructions (the
mbarrier retry paths are out of line, forward branches); the instructions per K block are the
range's count over (QGMMAs in the range / 8: four m64nNk32 per slab, two slabs a K block).
Prints per loop: range, instructions, QGMMAs, per K block, and the opcode classes per K block.
Usage: sass_kloop.py FILE.sass [--dump PREFIX]  (--dump writes each loop's lines to PREFIX_<i>.sass)"""
import re
import sys
from collections import Counter

LINE = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;')


def opclass(ins):
    op = ins.split()[0]
    if op.startswith('@'):
        op = ins.split()[1]
    base = op.split('.')[0]
    if base in ('QGMMA',):
        return 'QGMMA'
    if base in ('FFMA', 'FMUL', 'FADD'):
        return 'FFMA/FMUL'
    if base in ('LDS', 'LDG', 'LDSM'):
        return base
    if base.startswith('WARPGROUP') or base.startswith('SYNCS') or base in ('BAR', 'WARPSYNC'):
        return 'sync'
    if base in ('BRA', 'EXIT', 'BSYNC', 'BSSY', 'RET', 'CALL'):
        return 'branch'
    if base in ('NOP',):
        return 'NOP'
    if base.startswith('U') or base == 'S2UR' or base == 'R2UR':
        return 'uniform'
    return 'integer/other'


def main():
    path = sys.argv[1]
    dump = sys.argv[sys.argv.index('--dump') + 1] if '--dump' in sys.argv else None
    ins, labels, pending = [], {}, []
    for line in open(path):
        lm = re.match(r'\s*(\.L_x_\d+):', line)
        if lm:
            pending.append(lm.group(1))
            continue
        m = LINE.search(line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
            for name in pending:
                labels[name] = ins[-1][0]
            pending = []
    addr_index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r'\bBRA\s+(?:(0x[0-9a-f]+)|`?\(?(\.L_x_\d+))', text)
        if not m:
            continue
        t = int(m.group(1), 16) if m.group(1) else labels.get(m.group(2), 1 << 62)
        if t >= a or t not in addr_index:
            continue
        lo = addr_index[t]
        body = ins[lo:i + 1]
        q = sum(1 for _, x in body if 'QGMMA' in x)
        if q == 0:
            continue
        loops.append((lo, i, q, body))
    for n, (lo, hi, q, body) in enumerate(loops):
        blocks = q / 8
        cls = Counter(opclass(x) for _, x in body)
        print(f'loop {n}: 0x{ins[lo][0]:x}-0x{ins[hi][0]:x}, {len(body)} instructions, {q} QGMMA '
              f'({blocks:g} K blocks), {len(body) / blocks:.2f} per K block')
        print('   per K block: ' + ', '.join(f'{k} {v / blocks:.2f}' for k, v in sorted(cls.items())))
        if dump:
            with open(f'{dump}_{n}.sass', 'w') as f:
                for a, x in body:
                    f.write(f'/*{a:04x}*/ {x} ;\n')


if __name__ == '__main__':
    main()
