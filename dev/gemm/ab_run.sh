#!/usr/bin/env bash
# One device call: same-run A/B of the current kernel against an earlier kernel header.
# Builds gemm_bench twice (current, then BASELINE header), alternates the two binaries on the
# M=4096 dense shapes (new, base, new, base: clock drift shows as a difference between the two
# rounds), then one ncu profile of each on 4096x4096x7168 and 4096x7168x16384 (cycles do not
# depend on the clock). Usage on the device: BASELINE=dev/gemm/v9/sm90_fp8_gemm.cuh bash dev/gemm/ab_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
start=$(date +%s)
bash scripts/device_build.sh gemm_bench > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp build-device/bench/gemm_bench /tmp/bench_new
cp src/kernels/sm90_fp8_gemm.cuh /tmp/sm90_fp8_gemm.cuh.current
cp "$BASELINE" src/kernels/sm90_fp8_gemm.cuh
touch src/kernels/*.cu
cmake --build build-device -j "$(nproc)" --target gemm_bench >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
cp build-device/bench/gemm_bench /tmp/bench_base
cp /tmp/sm90_fp8_gemm.cuh.current src/kernels/sm90_fp8_gemm.cuh
cmp -s /tmp/bench_new /tmp/bench_base && { echo "the two binaries are identical"; exit 1; }
echo "builds: $(( $(date +%s) - start )) s"
for round in 1 2; do
  for v in new base; do
    timeout 100 /tmp/bench_$v --only dense --quick --out "$OUT/ab_${v}_$round.jsonl" > /dev/null 2>&1 || echo "bench $v $round failed"
  done
done
if command -v ncu >/dev/null; then
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
