#!/usr/bin/env bash
# gemm split-K (worktree /work/gemm-wt, branch gemm-splitk): GPU tests first (stop on failure),
# then gemm_bench at M = 128, 64 (heuristic, no-workspace pick, forced tiles/splits, cuBLASLt
# blockwise, alternated), JSON lines + logs to $OUT, short table last.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > "$OUT/env.txt" 2>&1
date -u >> "$OUT/env.txt"
t0=$(date +%s)
timeout 110 ./test_kernels_gpu > "$OUT/test.log" 2>&1
rc=$?
grep -E "^\[ *(OK|FAILED|PASSED) *\]|Failure|expected|Which is|rel_err" "$OUT/test.log" | grep -vE "rel_err=[0-9.e-]+ max_rel=[0-9.e-]+ nonfinite=0$" | tail -40
grep -E "split" "$OUT/test.log" | sed -n 's/.*rel_err=\([0-9.e+-]*\) max_rel=\([0-9.e+-]*\).*/\1 \2/p' | sort -g | awk '{n++; e=$1; if ($2 > mr) mr = $2} END {print n " split-K checks, largest rel_err " e ", largest max_rel " mr}'
echo "tests rc=$rc in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ]; then tail -30 "$OUT/test.log"; exit $rc; fi
t1=$(date +%s)
FP8MOE_COMMIT=798ce88+splitk timeout 120 ./gemm_bench --only dense --m 128,64 --out "$OUT/gemm_small.jsonl" > "$OUT/bench.log" 2>&1
brc=$?
echo "bench rc=$brc in $(( $(date +%s) - t1 )) s"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv >> "$OUT/env.txt" 2>&1
python3 splitk_summary.py "$OUT/gemm_small.jsonl"
exit $brc
