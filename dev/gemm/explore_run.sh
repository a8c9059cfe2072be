#!/usr/bin/env bash
# One device call of measurements (no A/B): builds gemm_bench with CANDIDATE_DIR's files over
# src/kernels (restored afterwards), times the M=4096 dense shapes once per value of
# FP8MOE_X_BAND in BANDS (the x13 raster experiment; pairs included), then ncu with warp-state
# statistics and per-SASS-instruction stall samples of ours (single CTAs and pairs) and cuBLASLt
# on 4096x4096x7168. Everything lands in $OUT/explore.tgz plus a summary on stdout.
# Usage on the device: CANDIDATE_DIR=dev/gemm/x13.patch BANDS="16 8 32 -8" bash dev/gemm/explore_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
W=/tmp/explore
mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
rm -rf /tmp/ex_orig && mkdir -p /tmp/ex_orig && cp src/kernels/* /tmp/ex_orig/
if [[ -n "${CANDIDATE_DIR:-}" ]]; then
  if [[ $CANDIDATE_DIR == *.patch ]]; then patch -s -p1 < "$CANDIDATE_DIR"; else cp "$CANDIDATE_DIR"/* src/kernels/; fi
  touch src/kernels/*
fi
start=$(date +%s)
bash scripts/device_build.sh gemm_bench > "$W/build.log" 2>&1 || { tail -40 "$W/build.log"; exit 1; }
cp /tmp/ex_orig/* src/kernels/
echo "build: $(( $(date +%s) - start )) s"
B=build-device/bench/gemm_bench
for band in ${BANDS:-16}; do
  FP8MOE_X_BAND=$band FP8MOE_BENCH_PAIRS=1 timeout 100 $B --only dense --quick --out "$W/band_$band.jsonl" > "$W/band_$band.log" 2>&1 || echo "band $band failed"
done
python3 - "$W" ${BANDS:-16} <<'PY'
import json, sys
d = sys.argv[1]; bands = sys.argv[2:]
rows = {}
for b in bands:
    try:
        lines = open(f"{d}/band_{b}.jsonl").read().splitlines()
    except OSError:
        continue
    for l in lines:
        r = json.loads(l)
        if r["impl"] not in ("fp8moe_forced_tile", "cublaslt_fp8_blockwise"): continue
        key = (r["n"], r["k"], r.get("tile", "") if r["impl"] != "cublaslt_fp8_blockwise" else "cublas")
        rows.setdefault(key, {})[b] = r["us"]
print(f"{'shape/tile':<40}" + "".join(f"{b:>9}" for b in bands))
for key, v in rows.items():
    if "192" in key[2]: continue
    print(f"{key[0]}x{key[1]} {key[2]:<28}" + "".join(f"{v.get(b, 0):9.1f}" for b in bands))
PY
if command -v ncu >/dev/null; then
  start=$(date +%s)
  FP8MOE_BENCH_PAIRS=1 timeout 240 ncu --clock-control none --kernel-name regex:'fp8_gemm_kernel|nvjet' --launch-skip 0 --launch-count 5 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis --section SchedulerStats \
    --import-source no -o "$W/prof" $B --profile 4096 4096 7168 > "$W/ncu_run.log" 2>&1
  echo "ncu: $(( $(date +%s) - start )) s, rc=$?"
  ncu -i "$W/prof.ncu-rep" --print-details all > "$W/ncu_details.txt" 2>&1
  grep -E '^  [a-zA-Z_].*\(|Elapsed Cycles|Stall (Wait|Barrier|Long Scoreboard|Short|Dispatch|Not Selected|Math|GMMA|Branch|Sleeping|Misc|No Inst)|Eligible Warps|L2 Cache Throughput' "$W/ncu_details.txt" | head -120
  for i in 0 1 2 3; do
    ncu -i "$W/prof.ncu-rep" --page source --print-source sass --csv --kernel-name regex:'fp8_gemm_kernel|nvjet' --launch-skip $i --launch-count 1 > "$W/src_$i.csv" 2> "$W/src_$i.err" || echo "source page $i failed: $(head -2 $W/src_$i.err)"
  done
  ls -la "$W"
fi
tar -czf "$OUT/explore.tgz" -C "$W" --exclude='*.ncu-rep' . && ls -la "$OUT"
cp "$W/prof.ncu-rep" "$OUT/" 2>/dev/null
