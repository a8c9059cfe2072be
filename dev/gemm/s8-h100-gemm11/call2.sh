#!/usr/bin/env bash
# gemm11, session 8, call 2 (H100): B scales loaded ahead (A) and the B-scale slot ring with the
# stage released before the promotion (B), against the session-7 pick; builds alternated twice.
# Builds (bench only): base = ede31d3 kernels; v1 = A + B; ahead = A only; ring = B only.
set -uo pipefail
D=build-gemm11
O=${OUT:-/tmp/out}; mkdir -p "$O"
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi128ELi128ELb1ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$O/env.txt" 2>&1
cuobjdump -sass -fun "$K" "$D/gemm_bench_v1" > "$O/v1_wgrad128.sass" 2>&1
echo "v1 sass lines $(wc -l < "$O/v1_wgrad128.sass"), spill ops $(grep -c -E 'STL|LDL' "$O/v1_wgrad128.sass")"
grep -n -E 'STL|LDL|QGMMA|WARPGROUP|UTMAREDG|SYNCS|BRA|EXIT' "$O/v1_wgrad128.sass" | cut -c1-150 > "$O/v1_landmarks.txt"
timeout 120 $D/test_kernels_gpu --gtest_filter='Fp8WgradGpu.*' > "$O/tests.log" 2>&1; echo "tests rc=$?"
grep -E '^\[  (PASSED|FAILED) |FAILED' "$O/tests.log" | tail -8
export FP8MOE_BENCH_WGRAD_TILES=128x128bq
mkdir -p "$O/rows"
for r in 1 2; do
  for b in base v1 ahead ring; do
    FP8MOE_COMMIT=ede31d3+gemm11-$b timeout 100 $D/gemm_bench_$b --only wgrad --out "$O/rows/${b}_r$r.jsonl" > "$O/rows/${b}_r$r.log" 2>&1
    echo "bench $b r$r rc=$?"
  done
done
python3 $D/summary.py "$O/rows" | tee "$O/summary.txt"
timeout 150 ncu --clock-control none --kernel-name-base mangled --kernel-name regex:'ILi128ELi128ELb1' \
  --launch-skip 3 --launch-count 1 --kill on --set full --import-source no -o "$O/prof" \
  "$D/gemm_bench_v1" --only wgrad > "$O/ncu_run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$O/prof.ncu-rep" --page details > "$O/ncu_details.txt" 2>&1
ncu -i "$O/prof.ncu-rep" --page source --print-source sass --csv > "$O/src.csv" 2> "$O/src.err"
python3 dev/gemm/ncu_stalls.py "$O/src.csv" 30 > "$O/stalls.txt" 2>&1
grep -E 'Duration|SM Frequency|Compute \(SM\) Throughput|L2 Cache Throughput|Local Memory Spilling Requests  |Issue Slots Busy' "$O/ncu_details.txt" | head -8
head -30 "$O/stalls.txt"
gzip -f "$O/src.csv"; rm -f "$O/prof.ncu-rep"
cd "$O" && tar czf c2.tgz env.txt v1_wgrad128.sass v1_landmarks.txt tests.log rows summary.txt ncu_run.log ncu_details.txt src.csv.gz stalls.txt && rm -rf v1_wgrad128.sass src.csv.gz rows
