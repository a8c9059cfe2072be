#!/usr/bin/env bash
# gemm11, session 8, call 6 (H100): F (wgrad stage release without carried address registers)
# plus straight-line runs of 16 (f16) or 32 (f32) K blocks in the wgrad loop (one unoverlapped
# promotion per run: 4 -> 2 -> 1 per 32-block tile), against the session-7 build; alternated
# twice. Tests: Fp8WgradGpu of both (the whole test_kernels_gpu left to the lead's final run: the
# session's device budget was near its floor).
set -uo pipefail
D=build-gemm11
O=${OUT:-/tmp/out}; mkdir -p "$O"
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi128ELi128ELb1ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$O/env.txt" 2>&1
for b in f16 f32; do
  cuobjdump -sass -fun "$K" "$D/gemm_bench_$b" > "$O/${b}_wgrad128.sass" 2>&1
  echo "$b sass lines $(wc -l < "$O/${b}_wgrad128.sass"), spill ops $(grep -c -E 'STL|LDL' "$O/${b}_wgrad128.sass")"
done
mkdir -p "$O/rows"
for r in 1 2; do
  for b in base f16 f32; do
    FP8MOE_COMMIT=ede31d3+gemm11-$b timeout 100 $D/gemm_bench_$b --only wgrad --out "$O/rows/${b}_r$r.jsonl" > "$O/rows/${b}_r$r.log" 2>&1
    echo "bench $b r$r rc=$?"
  done
done
python3 $D/summary.py "$O/rows" | tee "$O/summary.txt"
timeout 100 $D/test_kernels_gpu_f32 --gtest_filter='Fp8WgradGpu.*' > "$O/tests_f32.log" 2>&1; echo "tests f32 rc=$?"
grep -E '^\[  (PASSED|FAILED) |FAILED|differs' "$O/tests_f32.log" | tail -6
timeout 100 $D/test_kernels_gpu_f16 --gtest_filter='Fp8WgradGpu.*' > "$O/tests_f16.log" 2>&1; echo "tests f16 rc=$?"
grep -E '^\[  (PASSED|FAILED) |FAILED|differs' "$O/tests_f16.log" | tail -6
cd "$O" && tar czf c6.tgz env.txt *_wgrad128.sass tests_f32.log tests_f16.log rows summary.txt && rm -rf *_wgrad128.sass rows
