#!/usr/bin/env bash
# Session 13, ep17: the combine's local row reduction on one GPU, register path vs TMA-fed
# (bench/gpu/combine_rows_bench.cu; predictions in docs/comm/README.md, "Session 13: a TMA-fed row
# reduction for the combine (ep17)"). Binary: build-ep17/combine_rows_bench (stripped,
# BUILD_INFO.txt). Call: run(kind="nvidia-h200", carry=["build-ep17"],
#   command="bash build-ep17/run.sh")   (~60 s wall expected)
# Two processes, each: round 1 every variant (checked against the CPU reference, then timed),
# rounds 2-3 the regs rows, the fastest tma variant per piece and the anchors.
# One archive back: $OUT/ep17_s13_rows.tgz.
set -uo pipefail
bin=build-ep17 archive=build-ep17/bins.tar.xz name=ep17_s13_rows
# shellcheck source=scripts/device_call_prologue.sh
source "$(dirname "$0")/../scripts/device_call_prologue.sh" 2>/dev/null ||
  source "$(dirname "$0")/../../../scripts/device_call_prologue.sh"
commit=$(sed -n 's/^commit: //p' "$bin/BUILD_INFO.txt")
table=$bin/combine_rows_table.py
[[ -f $table ]] || table=docs/comm/runs/combine_rows_table.py
for i in 1 2; do
  timeout 90 "$bin/combine_rows_bench" --iters 30 --rounds 3 --date "$d" --commit "$commit" \
    --out "$R/rows_$i.jsonl" > "$R/rows_$i.log" 2>&1
  rc=$?
  el "process $i rc=$rc"
  grep -E '^# (combine|reduction|FAILED)' "$R/rows_$i.log"
  [[ -s $R/rows_$i.jsonl ]] && python3 "$table" "$R/rows_$i.jsonl" --sweep 12 > "$R/table_$i.md" 2>&1
  cat "$R/table_$i.md" 2>/dev/null
  pack
  if ((rc != 0)); then tail -3 "$R/rows_$i.log"; break; fi  # a hang or a failed check: once
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv >> "$R/machine.txt" 2>&1
pack
el done
