#!/usr/bin/env bash
# Session 10, ep13's second call: moe_forward_bench with the paths interleaved per iteration
# (call 1 timed them in separate blocks per round; its GEMM moved +-3 % from round to round, more
# than the effect). Same binaries as call 1 except moe_forward_bench (rebuilt: paired timing);
# BUILD_INFO.txt names the source. nvidia-smi logs SM clock and power beside it.
# Call: run(kind="nvidia-h100-x2", carry=["build-ep13"], command="bash build-ep13/run2.sh")
set -uo pipefail
root=$(cd "$(dirname "$0")" && pwd)
while [[ ! -d "$root/build-ep13" && "$root" != / ]]; do root=$(dirname "$root"); done
cd "$root" || exit 1
B=build-ep13
[[ -f $B/bins2.tar.xz && ! -x $B/moe_forward_bench ]] && tar xJf $B/bins2.tar.xz -C $B
[[ -x $B/moe_forward_bench ]] || { echo "no binaries in $root/$B"; exit 1; }
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
O=${OUT:-/tmp/ep13}; R=/tmp/ep13raw2; rm -rf "$R"; mkdir -p "$O" "$R"
{ date -u; nvidia-smi -L; cat "$B/BUILD_INFO.txt" 2>/dev/null; } > "$R/machine.txt" 2>&1; head -3 "$R/machine.txt"
t0=$(date +%s); el() { echo "$(( $(date +%s) - t0 )) s"; }
d=$(date -u +%F)
finish() { tar czf "$O/ep13_s10_call2.tgz" -C "$R" . ; echo "archive ($(el))"; }
trap finish EXIT
nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 > "$R/clocks.csv" 2>&1 &
smi=$!
for run in 1 2; do
  timeout 100 "$B/moe_forward_bench" --rounds 5 --iters 30 --out "$R/moe_forward.jsonl" --date "$d" \
    --commit "858bc83+ep13+gemm17" > "$R/moe_forward_$run.log" 2>&1
  echo "moe_forward_bench run $run rc=$? ($(el))"; grep -v "^round" "$R/moe_forward_$run.log"
done
kill $smi 2>/dev/null
awk -F', ' '{split($3,c," "); split($4,p," "); n[$2]++; s[$2]+=c[1]; w[$2]+=p[1]; if (c[1]<mn[$2]||mn[$2]=="") mn[$2]=c[1]} END {for (g in n) printf "gpu %s: %d samples, SM clock mean %.0f MHz (min %d), power mean %.0f W\n", g, n[g], s[g]/n[g], mn[g], w[g]/n[g]}' "$R/clocks.csv"
