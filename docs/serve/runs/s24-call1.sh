#!/usr/bin/env bash
# Session 24 call 1: serving over several ranks (serve/generator_group.h in-process, and the CLI
# under `fp8moe launch -n 2`), the GPU trainer after its job moved to comm/gpu_job.h.
# Call: run(kind="nvidia-h100-x2", carry=["build-s24/bins1.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s24-call1.sh", timeout_s=420)
set -uo pipefail
bin=build-s24/bin1 archive=build-s24/bins1.tar.xz name=s24_c1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|\[ group \]" "$1" | head -16; }
timeout 200 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "1. test_serve_gpu rc=$?"; summary "$R/serve_tests.log"
pack
timeout 120 "$bin/test_train_gpu" > "$R/train_tests.log" 2>&1
el "2. test_train_gpu rc=$?"; summary "$R/train_tests.log"
pack
# A small-gpu checkpoint trained on both GPUs (the trainer's job through comm/gpu_job.h).
timeout 150 "$bin/fp8moe" launch -n 2 -- "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 200 --batch 16 --seq 256 --no-progress --out /tmp/s24-c1 > "$R/train.log" 2>&1
el "3. small-gpu 200 steps on 2 GPUs rc=$?"; tail -2 "$R/train.log"
gen() {  # gen NAME RANKS ARGS...
  local n=$1 ranks=$2
  shift 2
  local pre=()
  [[ $ranks -gt 1 ]] && pre=("$bin/fp8moe" launch -n "$ranks" --no-prefix --)
  timeout 90 "${pre[@]}" "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s24-c1 \
    --prompts-file docs/serve/prompts.txt --max-new-tokens 48 --stats "$@" \
    > "$R/gen_$n.txt" 2> "$R/gen_$n.err"
  el "4. generate $n ($ranks ranks) rc=$?"; grep -h '^{' "$R/gen_$n.err" | head -2
}
gen one 1
gen two 2
gen one_sampled 1 --temperature 0.8 --top-p 0.9 --seed 5
gen two_sampled 2 --temperature 0.8 --top-p 0.9 --seed 5
gen two_draft 2 --mtp-draft
for pair in "one two" "one_sampled two_sampled" "two two_draft"; do
  set -- $pair
  echo "== $1 vs $2: $(paste -d'\n' "$R/gen_$1.txt" "$R/gen_$2.txt" | paste - - | awk -F'\t' '$1==$2{s++} END{print s+0 " of " NR " lines equal"}')"
done
head -3 "$R/gen_two.txt"
pack
timeout 150 "$bin/serve_bench" --devices 0,1 --configs small-gpu,v3-slice --batches 1,8,32,64 \
  --out "$R/serve_group.jsonl" --date "$d" > "$R/bench_group.log" 2>&1
el "5. serve_bench --devices 0,1 rc=$?"; cat "$R/bench_group.log"
pack
timeout 60 "$bin/serve_bench" --devices 0,0 --configs small-gpu --batches 8,64 \
  --out "$R/serve_group_shared.jsonl" --date "$d" > "$R/bench_shared.log" 2>&1
el "6. serve_bench --devices 0,0 rc=$?"; cat "$R/bench_shared.log"
pack
el done
