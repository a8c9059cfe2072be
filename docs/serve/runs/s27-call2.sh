#!/usr/bin/env bash
# Session 27 call 2 (4 GPUs): GeneratorGroup.FourRanksKeepTheText (new: the rank invariance and the
# low-latency check at four ranks) with the 2-rank GeneratorGroup tests; the masked tiles' change
# at four ranks, where 64 tokens a rank give v3-slice 64 rows an expert: moe_decode_bench and
# serve_bench --low-latency-ab, previous binaries (*_old, main d11c1aa) against this build.
# Call: run(kind="nvidia-h100-x4", carry=["build-s27/bins2.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s27-call2.sh", timeout_s=600)
set -uo pipefail
bin=build-s27/bin2 archive=build-s27/bins2.tar.xz name=s27_c2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|values differ|SKIPPED|\[ group \]" "$1" | head -40; }
timeout 240 "$bin/test_serve_gpu" --gtest_filter='GeneratorGroup*' > "$R/test_serve_group.log" 2>&1
el "1. test_serve_gpu GeneratorGroup* rc=$?"; summary "$R/test_serve_group.log"
pack
for v in moe_decode_bench_old moe_decode_bench moe_decode_bench_old moe_decode_bench; do
  timeout 100 "$bin/$v" --shapes v3-slice,v3 --tokens 32,64 --iters 5 --date "$d" \
    --out "$R/$v.jsonl" > "$R/bench_$v.log" 2>&1
  el "2. $v rc=$?"; grep -E "^(shape|v3)" "$R/bench_$v.log" | head -6
done
pack
for v in serve_bench_old serve_bench; do
  timeout 150 "$bin/$v" --devices 0,1,2,3 --low-latency-ab 1 --rounds 2 --configs v3-slice \
    --batches 32,64 --date "$d" --out "$R/$v.jsonl" > "$R/bench_$v.log" 2>&1
  el "3. $v --low-latency-ab rc=$?"; grep -E "^(config|v3)" "$R/bench_$v.log" | head -6
done
gzip -f "$R"/test_*.log
pack
el done
