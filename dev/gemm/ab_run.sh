#!/usr/bin/env bash
# One device call: same-run A/B of a new kernel against an older one.
# "new" is the working tree's src/kernels, or, with CANDIDATE_DIR set, src/kernels with the files
# of that folder copied over it (e.g. dev/gemm/v12: kernel header + heuristic). "base" is the
# working tree's src/kernels with BASELINE (an older kernel header) copied over it, or, without
# BASELINE, the unmodified src/kernels (so CANDIDATE_DIR alone compares a candidate with HEAD).
# Builds gemm_bench twice, alternates the two binaries on the M=4096 dense shapes (new, base, new,
# base: clock drift shows as a difference between the two rounds), then one ncu profile of each
# on 4096x4096x7168 and 4096x7168x16384 (cycles do not depend on the clock).
# TESTS=1 also builds and runs test_kernels_gpu on "new" first (and stops if it fails);
# FP8MOE_BENCH_PAIRS=1 adds the CTA-pair rows to the bench; NCU=0 skips the profiles.
# CANDIDATE_DIR and BASELINE may also be a .patch against src/kernels (patch -p1): rejected
# versions are kept that way (dev/gemm/v12.patch ...; the full copies are in git history, 5944f22).
# Usage on the device: BASELINE=dev/gemm/v9.patch bash dev/gemm/ab_run.sh
#                      CANDIDATE_DIR=dev/gemm/v12.patch TESTS=1 bash dev/gemm/ab_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
start=$(date +%s)
rm -rf /tmp/ab_orig && mkdir -p /tmp/ab_orig && cp src/kernels/* /tmp/ab_orig/
restore() { cp /tmp/ab_orig/* src/kernels/; touch src/kernels/*; }
if [[ -n "${CANDIDATE_DIR:-}" ]]; then
  if [[ $CANDIDATE_DIR == *.patch ]]; then patch -s -p1 < "$CANDIDATE_DIR"; else cp "$CANDIDATE_DIR"/* src/kernels/; fi
  touch src/kernels/*
fi
targets=(gemm_bench)
[[ "${TESTS:-0}" == 1 ]] && targets+=(test_kernels_gpu)
bash scripts/device_build.sh "${targets[@]}" > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp build-device/bench/gemm_bench /tmp/bench_new
if command -v cuobjdump >/dev/null; then
  cuobjdump --dump-sass build-device/src/libfp8moe_kernels.a > /tmp/sass.txt 2>/dev/null
  awk '/Function : /{p = /fp8_gemm_kernelILi128ELi128ELb0/} p' /tmp/sass.txt > "$OUT/k128_new.sass"
  echo "new k128: $(grep -c QGMMA "$OUT/k128_new.sass") QGMMA, $(grep -cE '\bLDL|\bSTL' "$OUT/k128_new.sass") LDL/STL"
fi
if [[ "${TESTS:-0}" == 1 ]]; then
  timeout 150 build-device/tests/test_kernels_gpu > "$OUT/test_gpu.log" 2>&1
  rc=$?
  grep -E "FAILED|PASSED|Failure" "$OUT/test_gpu.log" | head -20
  echo "gpu tests (new) rc=$rc"
  ((rc == 0)) || exit 1
fi
restore
if [[ -n "${BASELINE:-}" ]]; then
  if [[ $BASELINE == *.patch ]]; then patch -s -p1 < "$BASELINE"; else cp "$BASELINE" src/kernels/sm90_fp8_gemm.cuh; fi
  touch src/kernels/*
fi
cmake --build build-device -j "$(nproc)" --target gemm_bench >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp build-device/bench/gemm_bench /tmp/bench_base
restore
cmp -s /tmp/bench_new /tmp/bench_base && { echo "the two binaries are identical"; exit 1; }
echo "builds (+tests): $(( $(date +%s) - start )) s"
for round in 1 2; do
  for v in new base; do
    timeout 100 /tmp/bench_$v --only dense --quick --out "$OUT/ab_${v}_$round.jsonl" > /dev/null 2>&1 || echo "bench $v $round failed"
  done
done
if [[ "${NCU:-1}" == 1 ]] && command -v ncu >/dev/null; then
  for v in new base; do
    for shape in "4096 4096 7168" "4096 7168 16384"; do
      echo "== ncu $v $shape"
      timeout 100 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' --section SpeedOfLight --section ComputeWorkloadAnalysis /tmp/bench_$v --profile $shape > /tmp/ncu.txt 2>&1
      grep -E '^  [a-zA-Z_].*\(|Elapsed Cycles|^    Duration|SM Frequency' /tmp/ncu.txt
      cat /tmp/ncu.txt >> "$OUT/ncu_$v.txt"
    done
  done
fi
python3 dev/gemm/ab_table.py "$OUT"
