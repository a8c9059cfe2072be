#!/usr/bin/env bash
# Session 24's final validation call, on 2 GPUs: every GPU test binary this session's code reaches
# (kernels: the sampling kernels and mla_decode's per-device attribute; model; serve: device
# sampling and the two-GPU group; train: its job moved to comm/gpu_job.h) — test_kernels_gpu on
# GPU 1 beside test_model_gpu and test_serve_gpu on GPU 0, then test_train_gpu on both; then
# serve_bench (device vs host sampling, at vocabulary 2048 and V3's 129280) and the CLI's sampled
# MTP draft, after the device sampling's single wait a pass (the last change).
# (comm and moe are unchanged since session 22's final validation except the new comm/gpu_job.cu,
# which test_train_gpu and the CLI runs exercise; their binaries do not fit the 64 MiB carry.)
# Call: run(kind="nvidia-h100-x2", carry=["build-s24/bins-final.tar.xz", "build-bundle/lib"],
#           command="bash scripts/device_final_s24.sh", timeout_s=600)
set -uo pipefail
bin=build-s24/bin-final archive=build-s24/bins-final.tar.xz name=final_s24
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure" "$1" | head -12; }
run_on() {  # run_on GPU binary...
  local gpu=$1
  shift
  for t in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu timeout 400 "$bin/$t" > "$R/$t.log" 2>&1
    echo "$t rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
  done
}
run_on 1 test_kernels_gpu &
run_on 0 test_model_gpu test_serve_gpu
CUDA_VISIBLE_DEVICES=0 timeout 100 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,8,64 \
  --out "$R/serve.jsonl" --date "$d" > "$R/bench.log" 2>&1
el "serve_bench rc=$?"
CUDA_VISIBLE_DEVICES=0 timeout 100 "$bin/serve_bench" --configs small-gpu --vocab 129280 \
  --batches 1,8,64 --out "$R/serve_v3vocab.jsonl" --date "$d" > "$R/bench_v3vocab.log" 2>&1
el "serve_bench --vocab 129280 rc=$?"
CUDA_VISIBLE_DEVICES=0 timeout 100 "$bin/fp8moe" train --device gpu --config configs/small-gpu.json \
  --steps 200 --batch 16 --seq 256 --no-progress --out /tmp/s24-final > "$R/train.log" 2>&1
el "small-gpu 200 steps rc=$?"
for mode in plain draft plain_host draft_host; do
  flag=(--temperature 0.8 --top-p 0.9 --seed 5)
  [[ $mode == draft* ]] && flag+=(--mtp-draft)
  [[ $mode == *host ]] && flag+=(--host-sampling)
  CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/fp8moe" generate --device gpu --checkpoint /tmp/s24-final \
    --prompts-file docs/serve/prompts.txt --max-new-tokens 64 --stats "${flag[@]}" \
    > "$R/gen_$mode.txt" 2> "$R/gen_$mode.err"
  el "generate sampled $mode rc=$?"; tail -1 "$R/gen_$mode.err"
done
pack
wait
timeout 120 "$bin/test_train_gpu" > "$R/test_train_gpu.log" 2>&1
echo "test_train_gpu (2 GPUs) rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
cat "$R/rc.txt"
for t in test_kernels_gpu test_model_gpu test_serve_gpu test_train_gpu; do
  echo "== $t"
  summary "$R/$t.log"
done
cat "$R/bench.log" "$R/bench_v3vocab.log"
pack
el done
