#!/usr/bin/env bash
# gemm27: before (base 9e0e24c, git archive of src + include into $BASE) / after PTX of each .cu
# that includes the GEMM kernel headers, with the build's own nvcc command; WAIT labels renumbered
# (s9-prep/renum_wait.py), compared by tools/ptx_same_functions.py.
set -u
root=$(cd "$(dirname "$0")/../../.." && pwd)
BASE=${BASE:-/tmp/g27base} W=${W:-/tmp/g27ptx}
mkdir -p "$W"
cd "$root/build-bundle"
for f in kernels/sm90_fp8_gemm_1d2d kernels/sm90_fp8_gemm_1d1d kernels/sm90_fp8_gemm_gathered \
  comm/sm90_device_ep_combine comm/sm90_device_ep_dispatch; do
  g=${f#*/}
  cmd=$(ninja -t commands | grep -- "-c [^ ]*/src/$f.cu " | head -1 |
        sed -E 's/ -MD -MT [^ ]+ -MF [^ ]+//; s/ -c ([^ ]+) -o [^ ]+$/ -ptx \1 -o OUT/')
  after=${cmd/OUT/$W/a_$g.ptx}
  before=${cmd/OUT/$W/b_$g.ptx}
  before=${before//$root\/include/$BASE\/include}
  before=${before//$root\/src/$BASE\/src}
  eval "$after" && eval "$before" || { echo "nvcc failed: $f"; continue; }
  python3 "$root/dev/gemm/s9-prep/renum_wait.py" "$W/b_$g.ptx" "$W/b2_$g.ptx"
  python3 "$root/dev/gemm/s9-prep/renum_wait.py" "$W/a_$g.ptx" "$W/a2_$g.ptx"
  echo "== $f"
  python3 "$root/tools/ptx_same_functions.py" --before "$W/b2_$g.ptx" --after "$W/a2_$g.ptx"
  echo "rc=$?"
done
