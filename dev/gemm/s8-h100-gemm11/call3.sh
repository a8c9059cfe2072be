#!/usr/bin/env bash
# gemm11, session 8, call 3 (H100): epilogue 3 (slabs staged in the tile's last two stages,
# lent until the next tile has started: 6 stages instead of 4) against epilogue 2 and the
# session-7 build; the B-scale ring / look-ahead switches on and off under it.
# Builds (bench only): base = ede31d3; v2 = ring + look-ahead 4 + e3; v2a0 = ring, no look-ahead;
# v2r0a0 = neither. Tests: Fp8WgradGpu.* of v2 (LentStagesEpilogue, ForcedVariantsBitIdentical new).
set -uo pipefail
D=build-gemm11
O=${OUT:-/tmp/out}; mkdir -p "$O"
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi128ELi128ELb1ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$O/env.txt" 2>&1
for b in v2 v2r0a0; do
  cuobjdump -sass -fun "$K" "$D/gemm_bench_$b" > "$O/${b}_wgrad128.sass" 2>&1
  echo "$b sass lines $(wc -l < "$O/${b}_wgrad128.sass"), spill ops $(grep -c -E 'STL|LDL' "$O/${b}_wgrad128.sass")"
done
timeout 150 $D/test_kernels_gpu --gtest_filter='Fp8WgradGpu.*' > "$O/tests.log" 2>&1; echo "tests rc=$?"
grep -E '^\[  (PASSED|FAILED) |FAILED|differs' "$O/tests.log" | tail -8
mkdir -p "$O/rows"
for r in 1 2; do
  for b in base v2 v2a0 v2r0a0; do
    T=128x128e3q,128x128e3s5q,128x128e3s4q,128x128e3bq
    [[ $b == base ]] && T=128x128bq
    FP8MOE_BENCH_WGRAD_TILES=$T FP8MOE_COMMIT=ede31d3+gemm11-$b timeout 100 $D/gemm_bench_$b --only wgrad --out "$O/rows/${b}_r$r.jsonl" > "$O/rows/${b}_r$r.log" 2>&1
    echo "bench $b r$r rc=$?"
  done
done
python3 $D/summary.py "$O/rows" | tee "$O/summary.txt"
cd "$O" && tar czf c3.tgz env.txt *_wgrad128.sass tests.log rows summary.txt && rm -rf *_wgrad128.sass rows
