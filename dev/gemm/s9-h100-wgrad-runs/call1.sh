#!/usr/bin/env bash
# Session 9 (lead): gemm11's R, straight-line runs of 16 (f16) or 32 (f32) K blocks in the wgrad
# loop, timed at last (binaries built by gemm11 in session 8 from ede31d3 + F + R, the patch
# dev/gemm/s8-h100-gemm11/f_runs16_unmeasured.patch with FP8MOE_WGRAD_RUN 16 / 32), against
# main's kernels (gemm_bench of the session-8 final bundle: F in, runs of 8) and the session-7
# build (base, ede31d3), rounds alternated three times; Fp8WgradGpu of f16 and f32. build-wr/summary.py
# is a copy of dev/gemm/s8-h100-gemm11/summary.py.
# Call: run(kind="nvidia-h100-x1", carry=["build-wr"], command="bash build-wr/call1.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
D=build-wr
[[ -x $D/gemm_bench_main ]] || tar xJf $D/wr-bins.tar.xz -C $D
O=${OUT:-/tmp/out}; mkdir -p "$O"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv > "$O/env.txt" 2>&1
cat "$O/env.txt"
mkdir -p "$O/rows"
for r in 1 2 3; do
  for b in main f16 f32 base; do
    FP8MOE_COMMIT=wgrad-runs-$b timeout 100 $D/gemm_bench_$b --only wgrad --out "$O/rows/${b}_r$r.jsonl" > "$O/rows/${b}_r$r.log" 2>&1
    echo "bench $b r$r rc=$?"
  done
done
python3 $D/summary.py "$O/rows" | tee "$O/summary.txt"
for b in f16 f32; do
  timeout 100 $D/test_kernels_gpu_$b --gtest_filter='Fp8WgradGpu.*' > "$O/tests_$b.log" 2>&1; echo "tests $b rc=$?"
  grep -E '^\[  (PASSED|FAILED) |FAILED|differs' "$O/tests_$b.log" | tail -6
done
cd "$O" && tar czf wr1.tgz env.txt tests_f16.log tests_f32.log rows summary.txt && rm -rf rows
