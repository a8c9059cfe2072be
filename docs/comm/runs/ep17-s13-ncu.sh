#!/usr/bin/env bash
# Session 13, ep17 call 5: where the TMA-fed reduction's consumers spend their ~1 µs per item
# (call 4: the feed alone, x1, 123 µs; the consumers alone, x2, 254 µs at p1792:s4:t256:m1).
# 1. plain timings of the consumer-only half with each release mode (x2 a0/a1/a2) and x1;
# 2. ncu (--clock-control none) of k_tma: the x2 launch and the full variant's checked launch,
#    warp-state and source counters; the SASS with line info for scripts/comm/ncu_lines.py.
# Call: run(kind="nvidia-h200", carry=["build-ep17"], command="bash build-ep17/ncu.sh")
set -uo pipefail
bin=build-ep17 archive=build-ep17/bins.tar.xz name=ep17_s13_ncu
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../scripts/device_call_prologue.sh" 2>/dev/null ||
  source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
commit=$(sed -n 's/^commit: //p' "$bin/BUILD_INFO.txt")
V=tma:p1792:s4:t256:m1
timeout 60 "$bin/combine_rows_bench" --rounds 1 --iters 30 --date "$d" --commit "$commit" \
  --variants "regs:b0:q2,$V:a0:l0:b0,$V:a0:l0:x1:b0,$V:a0:l0:x2:b0,$V:a1:l0:x2:b0,$V:a2:l0:x2:b0" \
  --out "$R/halves.jsonl" > "$R/halves.log" 2>&1
el "1. halves rc=$?"; grep -E '^# round' "$R/halves.log"; pack
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 150 "$NCU" --clock-control none --kernel-name regex:k_tma --launch-count 2 \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight \
  --section MemoryWorkloadAnalysis -o "$R/tma" -f \
  "$bin/combine_rows_bench" --rounds 1 --iters 1 --warmup 0 \
  --variants "$V:a0:l0:x2:b0,$V:a0:l0:b0" > "$R/ncu.log" 2>&1
el "2. ncu rc=$?"; tail -3 "$R/ncu.log"
for k in 0 1; do
  "$NCU" -i "$R/tma.ncu-rep" --launch-skip $k --launch-count 1 --page details > "$R/details_$k.txt" 2>&1
  "$NCU" -i "$R/tma.ncu-rep" --launch-skip $k --launch-count 1 --page source --print-source sass \
    --csv > "$R/page_$k.csv" 2>&1
done
grep -E 'Stall|Warp Cycles|Issued|Throughput|Duration' "$R/details_0.txt" | head -20
mkdir -p "$R/cubin" && (cd "$R/cubin" && cuobjdump -xelf all "$OLDPWD/$bin/combine_rows_bench" > /dev/null 2>&1)
for c in "$R"/cubin/*.cubin; do nvdisasm -g -c "$c" > "${c%.cubin}.sass" 2>&1; done
rm -f "$R"/cubin/*.cubin
pack
el done
