#!/usr/bin/env bash
# One device call: same-run A/B of candidates against the working tree's src/kernels ("base").
# CANDIDATES: space-separated NAME=PATH: a folder whose files are copied over src/kernels, or a
# .patch against src/kernels applied with patch -p1 (how rejected versions are kept: dev/gemm/v13.patch).
# VARIANTS: space-separated VNAME=CAND:ENV,ENV,... (a candidate's binary run with those variables;
# ENV may be X=0 for none). TESTS=NAME builds and runs test_kernels_gpu on that candidate first
# (stops if it fails). Then ROUNDS rounds of the M=4096 dense shapes, every variant and base in
# turn (clock drift shows between rounds); ncu (warp states + per-SASS stall samples) of each
# variant on 4096x4096x7168; table via ab_multi_table.py; everything in $OUT/abm.tgz.
# Usage on the device: CANDIDATES="v14=dev/gemm/v14.patch" VARIANTS="v14=v14:X=0" TESTS=v14 bash dev/gemm/ab_multi.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
W=/tmp/abm
mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
start=$(date +%s)
rm -rf /tmp/abm_orig && mkdir -p /tmp/abm_orig && cp src/kernels/* /tmp/abm_orig/
restore() { cp /tmp/abm_orig/* src/kernels/; touch src/kernels/*; }
for c in $CANDIDATES; do
  name=${c%%=*}; dir=${c#*=}
  restore
  if [[ $dir == *.patch ]]; then patch -s -p1 < "$dir"; else cp "$dir"/* src/kernels/; fi && touch src/kernels/*
  targets=(gemm_bench)
  [[ "${TESTS:-}" == "$name" ]] && targets+=(test_kernels_gpu)
  bash scripts/device_build.sh "${targets[@]}" >> "$W/build.log" 2>&1 || { tail -40 "$W/build.log"; restore; exit 1; }
  cp build-device/bench/gemm_bench "/tmp/bench_$name"
  cuobjdump --dump-sass "/tmp/bench_$name" 2>/dev/null | awk '/Function : /{p = /fp8_gemm_kernelILi128ELi128ELb0/} p' > "$W/k128_$name.sass"
  echo "$name k128: $(grep -c QGMMA "$W/k128_$name.sass") QGMMA, $(grep -cE '\bLDL|\bSTL' "$W/k128_$name.sass") LDL/STL"
  if [[ "${TESTS:-}" == "$name" ]]; then
    timeout 150 build-device/tests/test_kernels_gpu > "$OUT/test_gpu_$name.log" 2>&1
    rc=$?
    grep -E "FAILED|PASSED|Failure" "$OUT/test_gpu_$name.log" | head -20
    echo "gpu tests ($name) rc=$rc"
    ((rc == 0)) || { restore; exit 1; }
  fi
done
restore
cmake --build build-device -j "$(nproc)" --target gemm_bench >> "$W/build.log" 2>&1 || { tail -40 "$W/build.log"; exit 1; }
cp build-device/bench/gemm_bench /tmp/bench_base
echo "builds (+tests): $(( $(date +%s) - start )) s"
run_variant() {  # name binary env-list round
  local name=$1 bin=$2 envs=$3 round=$4
  env $(echo "$envs" | tr ',' ' ') FP8MOE_BENCH_PAIRS=${PAIRS:-0} timeout 100 "$bin" --only dense --quick --out "$W/ab_${name}_$round.jsonl" > /dev/null 2>&1 || echo "bench $name $round failed"
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in $VARIANTS; do spec=${v#*=}; run_variant "${v%%=*}" "/tmp/bench_${spec%%:*}" "${spec#*:}" "$round"; done
  run_variant base /tmp/bench_base "X=0" "$round"
done
python3 dev/gemm/ab_multi_table.py "$W" | tee "$W/table.txt"
if [[ "${NCU:-1}" == 1 ]] && command -v ncu >/dev/null; then
  for v in $VARIANTS base; do
    name=${v%%=*}; spec=${v#*=}; envs=${spec#*:}; bin=/tmp/bench_${spec%%:*}
    [[ $name == base ]] && { envs="X=0"; bin=/tmp/bench_base; }
    env $(echo "$envs" | tr ',' ' ') timeout 120 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel' --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SourceCounters --import-source no -o "$W/prof_$name" "$bin" --profile 4096 4096 7168 > /dev/null 2>&1
    ncu -i "$W/prof_$name.ncu-rep" --print-details all > "$W/ncu_$name.txt" 2>&1
    echo "== ncu $name: $(grep -E 'Elapsed Cycles' "$W/ncu_$name.txt" | head -1 | awk '{print $NF}') cycles"
    grep -E 'Stall (Wait|Long Scoreboard|Dispatch|GMMA|Not Selected|Barrier|Misc)  |Compute \(SM\) Throughput|L2 Cache Throughput' "$W/ncu_$name.txt" | head -12
    ncu -i "$W/prof_$name.ncu-rep" --page source --print-source sass --csv > "$W/src_$name.csv" 2>/dev/null
  done
fi
tar -czf "$OUT/abm.tgz" -C "$W" --exclude='*.ncu-rep' . && ls -la "$OUT"
