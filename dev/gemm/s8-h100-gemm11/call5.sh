#!/usr/bin/env bash
# gemm11, session 8, call 5 (H100): F = the wgrad stage release with its peer addresses defined
# on both paths (no address registers held across the K loop: spill 120 -> 12 B); FD = F + the
# scale-copy warp (D). Against the session-7 build, alternated twice. Tests: Fp8WgradGpu of F,
# the whole test_kernels_gpu of FD. SASS spill counts, ncu of FD.
set -uo pipefail
D=build-gemm11
O=${OUT:-/tmp/out}; mkdir -p "$O"
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi128ELi128ELb1ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$O/env.txt" 2>&1
for b in f fd; do
  cuobjdump -sass -fun "$K" "$D/gemm_bench_$b" > "$O/${b}_wgrad128.sass" 2>&1
  echo "$b sass lines $(wc -l < "$O/${b}_wgrad128.sass"), spill ops $(grep -c -E 'STL|LDL' "$O/${b}_wgrad128.sass")"
done
timeout 150 $D/test_kernels_gpu_f --gtest_filter='Fp8WgradGpu.*' > "$O/tests_f.log" 2>&1; echo "tests f rc=$?"
grep -E '^\[  (PASSED|FAILED) |FAILED|differs' "$O/tests_f.log" | tail -6
timeout 300 $D/test_kernels_gpu_fd > "$O/tests_fd_all.log" 2>&1; echo "tests fd (all) rc=$?"
grep -E '^\[  (PASSED|FAILED) |FAILED|differs' "$O/tests_fd_all.log" | tail -8
mkdir -p "$O/rows"
for r in 1 2; do
  for b in base f fd; do
    FP8MOE_BENCH_WGRAD_TILES=128x128bq FP8MOE_COMMIT=ede31d3+gemm11-$b timeout 100 $D/gemm_bench_$b --only wgrad --out "$O/rows/${b}_r$r.jsonl" > "$O/rows/${b}_r$r.log" 2>&1
    echo "bench $b r$r rc=$?"
  done
done
python3 $D/summary.py "$O/rows" | tee "$O/summary.txt"
timeout 150 ncu --clock-control none --kernel-name-base mangled --kernel-name regex:'ILi128ELi128ELb1' \
  --launch-skip 3 --launch-count 1 --kill on --set full --import-source no -o "$O/prof" \
  "$D/gemm_bench_fd" --only wgrad > "$O/ncu_run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$O/prof.ncu-rep" --page details > "$O/ncu_details.txt" 2>&1
ncu -i "$O/prof.ncu-rep" --page source --print-source sass --csv > "$O/src.csv" 2> "$O/src.err"
python3 dev/gemm/ncu_stalls.py "$O/src.csv" 30 > "$O/stalls.txt" 2>&1
grep -E 'Duration|SM Frequency|Compute \(SM\) Throughput|L2 Cache Throughput|Local Memory Spilling Requests  |Issue Slots Busy' "$O/ncu_details.txt" | head -8
head -22 "$O/stalls.txt"
gzip -f "$O/src.csv"; rm -f "$O/prof.ncu-rep"
cd "$O" && tar czf c5.tgz env.txt *_wgrad128.sass tests_f.log tests_fd_all.log rows summary.txt ncu_run.log ncu_details.txt src.csv.gz stalls.txt && rm -rf *_wgrad128.sass src.csv.gz rows tests_fd_all.log
