#!/usr/bin/env bash
# Lead, session 7: where the 128x128 weight-gradient kernel spends its time (for session 8).
# SASS of the kernel (where its 120 bytes of spill sit: STL/LDL lines), ncu of one launch of the
# pick (epilogue 2, overlapped promotion) at 7168x2048x4096: details page and per-SASS stalls.
# Run from the repo root on the device with build-bundle/bin/gemm_bench carried.
set -uo pipefail
B=build-bundle/bin
O=${OUT:-/tmp/out}; mkdir -p "$O"
K=_ZN6fp8moe7kernels4sm9015fp8_gemm_kernelILi128ELi128ELb1ELb0ELb0ELi0EEEv14CUtensorMap_stS3_S3_S3_S3_NS1_10GemmParamsE
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv > "$O/env.txt" 2>&1
cuobjdump -sass -fun "$K" "$B/gemm_bench" > "$O/wgrad128.sass" 2>&1
echo "sass lines $(wc -l < "$O/wgrad128.sass"), spill ops $(grep -c -E 'STL|LDL' "$O/wgrad128.sass")"
grep -n -E 'STL|LDL|HGMMA|WARPGROUP|UBLKRED|UTMAREDG|UTMASTG|BAR|EXIT' "$O/wgrad128.sass" | cut -c1-140 > "$O/sass_landmarks.txt"
timeout 150 ncu --clock-control none --kernel-name-base mangled --kernel-name regex:'ILi128ELi128ELb1' \
  --launch-skip 3 --launch-count 1 --kill on --set full --import-source no -o "$O/prof" \
  "$B/gemm_bench" --only wgrad > "$O/ncu_run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$O/prof.ncu-rep" --page details > "$O/ncu_details.txt" 2>&1
ncu -i "$O/prof.ncu-rep" --page source --print-source sass --csv > "$O/src.csv" 2> "$O/src.err"
python3 dev/gemm/ncu_stalls.py "$O/src.csv" 30 > "$O/stalls.txt" 2>&1
grep -E 'Duration|Elapsed Cycles|Registers Per|Compute \(SM\) Throughput|Memory Throughput|Local|Achieved Occupancy|Issue Slots Busy|No Eligible' "$O/ncu_details.txt" | head -20
head -40 "$O/stalls.txt"
gzip -f "$O/src.csv"; rm -f "$O/prof.ncu-rep"
cd "$O" && tar czf wgrad_profile.tgz env.txt wgrad128.sass sass_landmarks.txt ncu_run.log ncu_details.txt src.csv.gz src.err stalls.txt && rm -f wgrad128.sass src.csv.gz
