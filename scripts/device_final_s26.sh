#!/usr/bin/env bash
# Session 26's final validation call, on 2 GPUs: every GPU test binary this session's code reaches
# (kernels: the masked GEMMs' expected_m hint and cursor kernels; moe: ExpertFfnGpu's masked hint;
# comm: MoeLayerGpu's masked path; model: the decoder's low-latency endpoint; serve: the lockstep
# vote and low_latency_ep; train: the decoder's constructor) — test_kernels_gpu on GPU 1 beside
# test_moe_gpu and test_model_gpu on GPU 0, then test_serve_gpu, test_train_gpu and
# test_comm_gpu's MoeLayer* on both; the CLI: a 100-step small-gpu checkpoint, generate over 2
# ranks (`fp8moe launch`: EP endpoints through CUDA IPC) with the low-latency decoding exchange
# (default) and with --normal-ep-decoding, texts compared line by line.
# Call: run(kind="nvidia-h100-x2", carry=["build-s26/bins-final.tar.xz", "build-bundle/lib"],
#           command="bash scripts/device_final_s26.sh", timeout_s=600)
set -uo pipefail
bin=build-s26/bin-final archive=build-s26/bins-final.tar.xz name=final_s26
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]" "$1" | head -12; }
run_on() {  # run_on GPU binary [filter]
  local gpu=$1 t=$2 filter=${3:-*}
  CUDA_VISIBLE_DEVICES=$gpu timeout 400 "$bin/$t" --gtest_filter="$filter" > "$R/$t.log" 2>&1
  echo "$t (GPU $gpu) rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
}
run_on 1 test_kernels_gpu &
{ run_on 0 test_moe_gpu; run_on 0 test_model_gpu; }
wait
pack
run_on 0,1 test_serve_gpu
run_on 0,1 test_train_gpu
run_on 0,1 test_comm_gpu 'MoeLayer*'
pack
CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 100 --batch 16 --seq 256 --no-progress --out /tmp/s26-final > "$R/train.log" 2>&1
el "small-gpu 100 steps rc=$?"
gen() {  # gen NAME ARGS... (two ranks)
  local n=$1
  shift
  timeout 90 "$bin/fp8moe" launch -n 2 --no-prefix -- "$bin/fp8moe" generate --device gpu \
    --checkpoint /tmp/s26-final --prompts-file docs/serve/prompts.txt --max-new-tokens 32 --stats "$@" \
    > "$R/gen_$n.txt" 2> "$R/gen_$n.err"
  el "generate $n rc=$?"
}
gen low_latency
gen normal --normal-ep-decoding
echo "== low-latency vs normal decoding exchange: $(paste "$R/gen_low_latency.txt" "$R/gen_normal.txt" | awk -F'\t' '$1==$2{s++} END{print s+0 " of " NR " lines equal"}')"
grep -h "decode" "$R"/gen_*.err | head -4
cat "$R/rc.txt"
for t in test_kernels_gpu test_moe_gpu test_model_gpu test_serve_gpu test_train_gpu test_comm_gpu; do
  echo "== $t"
  summary "$R/$t.log"
done
gzip -f "$R"/test_*.log
pack
el done
