#!/usr/bin/env bash
# gemm11, session 8, call 1 (H100): where the 128x128 weight-gradient kernel spends its time.
# SASS (spill lines in context), Fp8WgradGpu tests (CTA pairs new), the wgrad rows with forced
# variants (stages 2/3, CTA pairs, 64x128), ncu of the pick (details + per-SASS stalls).
# Run from the repo root: bash build-gemm11/run.sh (binaries built in /work/gemm11).
set -uo pipefail
D=build-gemm11
O=${OUT:-/tmp/out}; mkdir -p "$O"
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi128ELi128ELb1ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$O/env.txt" 2>&1
cat "$O/env.txt"
cuobjdump -sass -fun "$K" "$D/gemm_bench" > "$O/wgrad128.sass" 2>&1
echo "sass lines $(wc -l < "$O/wgrad128.sass"), spill ops $(grep -c -E 'STL|LDL' "$O/wgrad128.sass")"
grep -n -E 'STL|LDL|QGMMA|WARPGROUP|UBLKRED|UTMAREDG|UTMASTG|BAR|EXIT|SYNCS|WARPSYNC|BRA|RET' "$O/wgrad128.sass" | cut -c1-150 > "$O/sass_landmarks.txt"
$D/test_kernels_gpu --gtest_filter='Fp8WgradGpu.*' > "$O/tests.log" 2>&1; echo "tests rc=$?"
grep -E '^\[  (PASSED|FAILED) |wgrad' "$O/tests.log" | tail -30
export FP8MOE_BENCH_WGRAD_TILES=128x128s3q,128x128s2q,128x128bq,128x128bs3q,64x128q
for r in 1 2; do
  FP8MOE_COMMIT=ede31d3+gemm11c1 $D/gemm_bench --only wgrad --out "$O/wgrad_r$r.jsonl" > "$O/bench_r$r.log" 2>&1
  echo "bench r$r rc=$?"
done
python3 - "$O"/wgrad_r1.jsonl "$O"/wgrad_r2.jsonl <<'PY'
import json, sys
for f in sys.argv[1:]:
    for l in open(f):
        r = json.loads(l)
        print(f"{f[-8:-6]} {r['kind'][:6]} {r['m']}x{r['n']}x{r['k']} g{r['groups']} {r['impl'][:18]:18} {r.get('tile','')[:40]:40} {r['us']:8.1f} us {r['tflops']:6.0f} diff_pick={r.get('rel_diff_pick','')}")
PY
timeout 200 ncu --clock-control none --kernel-name-base mangled --kernel-name regex:'ILi128ELi128ELb1' \
  --launch-skip 3 --launch-count 1 --kill on --set full --import-source no -o "$O/prof" \
  "$D/gemm_bench" --only wgrad > "$O/ncu_run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$O/prof.ncu-rep" --page details > "$O/ncu_details.txt" 2>&1
ncu -i "$O/prof.ncu-rep" --page source --print-source sass --csv > "$O/src.csv" 2> "$O/src.err"
python3 dev/gemm/ncu_stalls.py "$O/src.csv" 40 > "$O/stalls.txt" 2>&1
grep -E 'Duration|Elapsed Cycles|SM Frequency|Registers Per|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Local|Achieved Occupancy|Issue Slots Busy|No Eligible|Shared Memory' "$O/ncu_details.txt" | head -24
head -45 "$O/stalls.txt"
gzip -f "$O/src.csv"; rm -f "$O/prof.ncu-rep"
cd "$O" && tar czf c1.tgz env.txt wgrad128.sass sass_landmarks.txt tests.log bench_r*.log wgrad_r*.jsonl ncu_run.log ncu_details.txt src.csv.gz src.err stalls.txt && rm -f wgrad128.sass src.csv.gz
