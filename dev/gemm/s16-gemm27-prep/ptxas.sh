#!/usr/bin/env bash
# gemm27: ptxas -v of sm90_fp8_gemm_1d2d.cu (the build's nvcc command with -cubin -Xptxas -v),
# one line per kernel: registers and spill stores / loads.
set -u
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root/build-bundle"
cmd=$(ninja -t commands | grep -- "-c [^ ]*/src/kernels/sm90_fp8_gemm_1d2d.cu " | head -1 |
      sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -c ([^ ]+) -o [^ ]+$/ -cubin -Xptxas -v \1 -o \/tmp\/g27_1d2d.cubin/')
eval "$cmd" 2>&1 | awk '
  /Compiling entry function/ { match($0, /_Z[A-Za-z0-9_]+/); name = substr($0, RSTART, RLENGTH) }
  /bytes spill stores/ { split($0, a, " "); st = a[5]; ld = a[9] }
  /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); r = substr($0, RSTART + 5, RLENGTH - 5);
    cmd = "c++filt " name; cmd | getline dm; close(cmd);
    sub(/fp8moe::kernels::sm90::/, "", dm); sub(/\(CUtensorMap_st.*/, "", dm);
    printf "%-58s regs %4d spill st/ld %s/%s\n", dm, r, st, ld }'
