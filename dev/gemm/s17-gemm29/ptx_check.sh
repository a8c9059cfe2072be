#!/usr/bin/env bash
# gemm29: before (main 12dc4f3, `git -C /work/main archive HEAD src include | tar x -C $BASE`) /
# after PTX of every .cu that includes the kernel header (sm90_fp8_gemm.cuh changed: 1d2d, 1d1d,
# gathered, host) with the build's own nvcc command; WAIT labels renumbered
# (s9-prep/renum_wait.py), compared by tools/ptx_same_functions.py (ptx_<file>.txt); then ptxas -v
# of the after PTX of 1d2d (registers / spills per kernel: ptxas_128x112.txt).
set -u
root=$(cd "$(dirname "$0")/../../.." && pwd)
BASE=${BASE:-/tmp/g29base} W=${W:-/tmp/g29ptx} OUTD=${OUTD:-$root/dev/gemm/s17-gemm29}
mkdir -p "$W"
cd "$root/build-bundle"
rc=0
for f in sm90_fp8_gemm_1d2d sm90_fp8_gemm_1d1d sm90_fp8_gemm_gathered sm90_fp8_gemm_host; do
  cmd=$(ninja -t commands | grep -- "-c [^ ]*/src/kernels/$f.cu " | head -1 |
        sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -c ([^ ]+) -o [^ ]+$/ -ptx \1 -o OUT/')
  after=${cmd/OUT/$W/a_$f.ptx}
  before=${cmd/OUT/$W/b_$f.ptx}
  before=${before//$root\/include/$BASE\/include}
  before=${before//$root\/src/$BASE\/src}
  eval "$after" && eval "$before" || exit 1
  for x in a b; do python3 "$root/dev/gemm/s9-prep/renum_wait.py" "$W/${x}_$f.ptx" "$W/${x}2_$f.ptx"; done
  python3 "$root/tools/ptx_same_functions.py" --before "$W/b2_$f.ptx" --after "$W/a2_$f.ptx" \
    > "$OUTD/ptx_$f.txt" 2>&1
  echo "$f: rc=$? $(tail -1 "$OUTD/ptx_$f.txt")"
done
/usr/local/cuda/bin/ptxas -arch=sm_90a -O3 -v "$W/a_sm90_fp8_gemm_1d2d.ptx" -o "$W/a.cubin" > "$W/ptxas.log" 2>&1
python3 - "$W/ptxas.log" > "$OUTD/ptxas_128x112.txt" <<'PY'
import re, sys
cur = None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m: cur = m.group(1)
    if cur and ("Used" in line or "spill" in line) and ("Li128ELi112E" in cur or "Li128ELi128E" in cur):
        print(cur, line.strip())
PY
exit $rc
