#!/usr/bin/env bash
# Session 25's final validation call, on 2 GPUs: every GPU test binary this session's code reaches
# (kernels: the absorb / unabsorb token slices; moe: the logical -> physical map; model: the expert
# load's running total and the placements; serve: redundant experts, batched prefill, the tests'
# shared helpers; train: ModelGpu's kept experts) — test_kernels_gpu on GPU 1 beside test_moe_gpu,
# test_model_gpu and test_serve_gpu on GPU 0 (the two-GPU serve tests then run in step 2), then
# test_serve_gpu and test_train_gpu on both; the CLI's redundant-experts pipeline over 2 ranks.
# (comm is unchanged this session: moe_layer_bench's weights moved to a shared header only.)
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins-final.tar.xz", "build-bundle/lib"],
#           command="bash scripts/device_final_s25.sh", timeout_s=600)
set -uo pipefail
bin=build-s25/bin-final archive=build-s25/bins-final.tar.xz name=final_s25
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]" "$1" | head -12; }
run_on() {  # run_on GPU binary...
  local gpu=$1
  shift
  for t in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu timeout 400 "$bin/$t" > "$R/$t.log" 2>&1
    echo "$t (GPU $gpu) rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
  done
}
run_on 1 test_kernels_gpu &
run_on 0 test_moe_gpu test_model_gpu
wait
pack
for t in test_serve_gpu test_train_gpu; do
  timeout 300 "$bin/$t" > "$R/$t.log" 2>&1
  echo "$t (2 GPUs) rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
done
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 100 --batch 16 --seq 256 --no-progress --out /tmp/s25-final > "$R/train.log" 2>&1
el "small-gpu 100 steps rc=$?"
gen() {  # gen NAME ARGS... (two ranks)
  local n=$1
  shift
  timeout 90 "$bin/fp8moe" launch -n 2 --no-prefix -- "$bin/fp8moe" generate --device gpu \
    --checkpoint /tmp/s25-final --prompts-file docs/serve/prompts.txt --max-new-tokens 32 "$@" \
    > "$R/gen_$n.txt" 2> "$R/gen_$n.err"
  el "generate $n rc=$?"
}
gen plain --expert-load-out "$R/load.json" --redundant-experts 4 --prefill-batch 4
timeout 30 "$bin/fp8moe" eplb --input "$R/load.json" --output "$R/plan.json"
el "fp8moe eplb rc=$?"
gen placed --expert-placement "$R/plan.json"
echo "== plain (--prefill-batch 4) vs placed: $(paste "$R/gen_plain.txt" "$R/gen_placed.txt" | awk -F'\t' '$1==$2{s++} END{print s+0 " of " NR " lines equal"}')"
cat "$R/rc.txt"
for t in test_kernels_gpu test_moe_gpu test_model_gpu test_serve_gpu test_train_gpu; do
  echo "== $t"
  summary "$R/$t.log"
done
gzip -f "$R"/test_*.log
pack
el done
