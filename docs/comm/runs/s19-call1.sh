#!/usr/bin/env bash
# Session 18 late, gr1 (prepared for session 19): the normal mode timed as CUDA-graph replays.
# ep_bench --graph N: after the eager rows of the default sweep, per rank N rounds of each op
# (FP8 dispatch layout only, combine_tokens after it, FP8 dispatch expanded, BF16 combine after
# it) captured in one graph each, NCCL's all-to-alls of the eager anchors' bytes likewise; every
# graph checked once against the reference, then 3 timing rounds with the order rotating; rows
# with note "graph_rounds=4 ...", a "# summary, graph replays" block. Predictions and arithmetic:
# docs/comm/README.md "Session 18 late: the normal mode as graph replays, prepared (gr1)".
# Binaries: branch gr1 (ep_bench only; no library change), `cmake --build build-bundle --target
# ep_bench`, stripped and xz-packed into build-gr1/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-gr1"], command="bash build-gr1/run.sh")
#   1. two processes on GPUs 0,1 (the defaults sweep + --graph 4), each under timeout 60;
#   2. one process on every GPU if the machine has more than 2 (timeout 75);
#   2b. one traced eager round of the defaults (FP8MOE_EP_TRACE=1: the layout-only dispatch's stamps);
#   3. scripts/comm/ep_results_table.py --graph over the rows (graph_table.md).
# Read: the "# summary" and "# summary, graph replays" blocks of graph_x2_*.log, graph_table.md.
# One archive back: $OUT/gr1_s19.tgz. Expected ~60-90 s wall on 2 GPUs (+ a cold start), < 200 s
# by its timeouts.
set -uo pipefail
bin=build-gr1/bin archive=build-gr1/bins.tar.xz name=gr1_s19
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
cat build-gr1/BUILD_INFO.txt >> "$R/machine.txt" 2>/dev/null
head -4 "$R/machine.txt"
n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
COMMON=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --graph 4 --date "$d"
  --commit "${FP8MOE_COMMIT:-gr1}")

# 1. Two processes on GPUs 0,1.
for i in 1 2; do
  CUDA_VISIBLE_DEVICES=0,1 timeout 60 "$bin/ep_bench" "${COMMON[@]}" \
    --out "$R/graph_x2_$i.jsonl" > "$R/graph_x2_$i.log" 2>&1
  el "1. x2 process $i rc=$?"
  grep -E "^# summary" -A20 "$R/graph_x2_$i.log" | grep -E "^# summary|^normal|^# graph|MISMATCH"
  grep -E "not measured|^ep_bench:" "$R/graph_x2_$i.log" | head -5
  pack
done

# 2. Every GPU, if more than 2.
if ((n > 2)); then
  timeout 75 "$bin/ep_bench" "${COMMON[@]}" --out "$R/graph_x$n.jsonl" > "$R/graph_x$n.log" 2>&1
  el "2. x$n rc=$?"
  grep -E "^# summary" -A20 "$R/graph_x$n.log" | grep -E "^# summary|^normal|^# graph|MISMATCH"
  grep -E "not measured|^ep_bench:" "$R/graph_x$n.log" | head -5
  pack
fi

# 2b. The stamps (FP8MOE_EP_TRACE=1) of one eager round of the defaults on GPUs 0,1: where the
# layout-only dispatch's ~105 us go today (ep25's were session 15's, before payload claims
# landed): the payload's start, the send blocks' first and last ends, the receive's end. Added by
# the lead (session 18) beside gr1's steps; ep_bench's --ab path, as runs/ep-s11-call1.sh.
FP8MOE_EP_TRACE=1 CUDA_VISIBLE_DEVICES=0,1 timeout 40 "$bin/ep_bench" --ab default --ab-rounds 1 \
  --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --out "$R/trace.jsonl" \
  > "$R/trace.log" 2>&1
el "2b. trace rc=$?"
grep -iE "trace|stamp" "$R/trace.log" | head -30
pack

# 3. The graph table (ours / NCCL's graphs, eager beside) of every process.
for f in "$R"/graph_x*.jsonl; do
  [[ -s $f ]] || continue
  echo "## $(basename "$f")"
  python3 scripts/comm/ep_results_table.py --graph "$f"
done > "$R/graph_table.md" 2>&1
cat "$R/graph_table.md"
pack
# 4. (session 19) The combine's chunk 4 against the default 8 on the card that came (m4's A/B,
# without the patch: ep_bench's :m4 letter), two processes x 3 rounds.
for i in 1 2; do
  CUDA_VISIBLE_DEVICES=0,1 timeout 60 "$bin/ep_bench" --ab default,default:m4 --ab-rounds 3 \
    --blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$d" --out "$R/m4_$i.jsonl" \
    > "$R/m4_$i.log" 2>&1
  el "4. m4 A/B $i rc=$?"
  grep -E "^# ab normal" "$R/m4_$i.log"
  pack
done
el "done"
