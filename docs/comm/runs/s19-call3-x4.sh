#!/usr/bin/env bash
# Session 19, call 3 (kind nvidia-h100-x4): gr1's graph rows at 4 ranks and the combine's chunk 4
# at 4 ranks (ep_bench of main 89e251e + gr1 = build-gr1, where the default chunk is still 8).
#   1. ep_bench --graph 4 on every GPU (one process), the defaults sweep + graph rows;
#   2. ep_bench --ab default,default:m4 --ab-rounds 3 on every GPU.
# Call: run(kind="nvidia-h100-x4", carry=["build-gr1"], command="bash build-gr1/run.sh")
set -uo pipefail
bin=build-gr1/bin archive=build-gr1/bins.tar.xz name=s19_call3
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -5 "$R/machine.txt"
n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
COMMON=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d")
timeout 100 "$bin/ep_bench" "${COMMON[@]}" --graph 4 --out "$R/graph_x$n.jsonl" > "$R/graph_x$n.log" 2>&1
el "1. graph x$n rc=$?"
grep -E "^# summary" -A20 "$R/graph_x$n.log" | grep -E "^# summary|^normal|^# graph|MISMATCH"
pack
timeout 100 "$bin/ep_bench" "${COMMON[@]}" --ab default,default:m4 --ab-rounds 3 \
  --out "$R/m4_x$n.jsonl" > "$R/m4_x$n.log" 2>&1
el "2. m4 x$n rc=$?"
grep -E "^# ab normal" "$R/m4_x$n.log"
pack
el done
