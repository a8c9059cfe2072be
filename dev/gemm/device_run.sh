#!/usr/bin/env bash
# One device call: toolchain check, build, GPU tests, benchmark. Logs and JSON go to $OUT.
# Usage on the device: bash dev/gemm/device_run.sh [test-filter] [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
filter=${1:-*}
shift || true
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)
bash scripts/device_build.sh test_kernels test_kernels_gpu gemm_bench > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
if command -v cuobjdump >/dev/null; then
  cuobjdump --dump-sass build-device/src/libfp8moe_kernels.a > /tmp/sass.txt 2>/dev/null
  echo "SASS: $(grep -c QGMMA /tmp/sass.txt) QGMMA, $(grep -c UTMALDG /tmp/sass.txt) UTMALDG, $(grep -c USETMAXREG /tmp/sass.txt) USETMAXREG, $(grep -cE '\bLDL|\bSTL' /tmp/sass.txt) LDL/STL"
  # The 128x128 1x128 x 128x128 kernel, for reading the main loop (no SASS tools off the device).
  awk '/Function : /{p = /fp8_gemm_kernelILi128ELi128ELb0/} p' /tmp/sass.txt > "$OUT/k128.sass"
  echo "k128: $(grep -c QGMMA "$OUT/k128.sass") QGMMA, $(grep -cE '\bLDL|\bSTL' "$OUT/k128.sass") LDL/STL, $(grep -c 'WARPGROUP.DEPBAR\|WARPSYNC' "$OUT/k128.sass") depbar/warpsync"
fi
build-device/tests/test_kernels > "$OUT/test_cpu.log" 2>&1; echo "cpu tests rc=$?"; tail -3 "$OUT/test_cpu.log"
start=$(date +%s)
timeout 150 build-device/tests/test_kernels_gpu --gtest_filter="$filter" --gtest_also_run_disabled_tests 2>&1 | tee "$OUT/test_gpu.log" | grep -E "^(dense|grouped|wgrad|kgrouped|[0-9]+x)|FAILED|PASSED|Failure|error" | head -80
echo "gpu tests: $(( $(date +%s) - start )) s"
if [[ "${BENCH:-1}" == 1 ]]; then
  timeout 200 build-device/bench/gemm_bench --out "$OUT/gemm.jsonl" "$@" 2>&1 | tee "$OUT/bench.log"
  if [[ "${PAIRS:-0}" == 1 ]]; then FP8MOE_GEMM_VERBOSE=1 FP8MOE_BENCH_PAIRS=1 timeout 100 build-device/bench/gemm_bench --only dense --quick --out "$OUT/gemm_pairs.jsonl" 2>&1 | tee "$OUT/bench_pairs.log"; fi
fi
# Same-run baseline: BASELINE=path/to/sm90_fp8_gemm.cuh rebuilds gemm_bench with that kernel
# header (an earlier version kept under dev/gemm/vN/) and times the M=4096 dense shapes again.
if [[ -n "${BASELINE:-}" ]]; then
  cp src/kernels/sm90_fp8_gemm.cuh /tmp/sm90_fp8_gemm.cuh.current
  cp "$BASELINE" src/kernels/sm90_fp8_gemm.cuh
  touch src/kernels/*.cu  # in case the header dependency is not tracked
  start=$(date +%s)
  cmake --build build-device -j "$(nproc)" --target gemm_bench > /tmp/build_base.log 2>&1 || { tail -40 /tmp/build_base.log; exit 1; }
  echo "baseline build: $(( $(date +%s) - start )) s"
  timeout 120 build-device/bench/gemm_bench --only dense --quick --out "$OUT/gemm_base.jsonl" 2>&1 | grep -E "fp8moe|blockwise"
  cp /tmp/sm90_fp8_gemm.cuh.current src/kernels/sm90_fp8_gemm.cuh
fi
# One launch each of ours and cuBLASLt on 4096x4096x7168 under ncu (no fixed clocks).
if [[ "${NCU:-0}" == 1 ]] && command -v ncu >/dev/null; then
  timeout 200 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section InstructionStats --section SchedulerStats --print-details all build-device/bench/gemm_bench --profile 4096 4096 7168 > "$OUT/ncu.txt" 2>&1
  grep -E '^  [a-zA-Z_].*\(|Elapsed Cycles|^    Duration|Issued Instructions  ' "$OUT/ncu.txt"
fi
