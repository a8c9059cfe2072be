#!/usr/bin/env bash
# gemm28: before (base fcabdc2, `git -C /work/main archive HEAD src include` into $BASE) / after PTX
# of sm90_fp8_gemm_1d2d.cu (the only .cu touched that holds kernels) with the build's own nvcc
# command; WAIT labels renumbered (s9-prep/renum_wait.py), compared by tools/ptx_same_functions.py;
# then ptxas -v of the after PTX (registers / spills per kernel: ptxas_128x64.txt).
set -u
root=$(cd "$(dirname "$0")/../../.." && pwd)
BASE=${BASE:-/tmp/g28base} W=${W:-/tmp/g28ptx}
mkdir -p "$W"
cd "$root/build-bundle"
cmd=$(ninja -t commands | grep -- "-c [^ ]*/src/kernels/sm90_fp8_gemm_1d2d.cu " | head -1 |
      sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -c ([^ ]+) -o [^ ]+$/ -ptx \1 -o OUT/')
after=${cmd/OUT/$W/a_1d2d.ptx}
before=${cmd/OUT/$W/b_1d2d.ptx}
before=${before//$root\/include/$BASE\/include}
before=${before//$root\/src/$BASE\/src}
eval "$after" && eval "$before" || exit 1
for x in a b; do python3 "$root/dev/gemm/s9-prep/renum_wait.py" "$W/${x}_1d2d.ptx" "$W/${x}2_1d2d.ptx"; done
python3 "$root/tools/ptx_same_functions.py" --before "$W/b2_1d2d.ptx" --after "$W/a2_1d2d.ptx"
/usr/local/cuda/bin/ptxas -arch=sm_90a -O3 -v "$W/a_1d2d.ptx" -o "$W/a.cubin" > "$W/ptxas.log" 2>&1
