#!/usr/bin/env bash
# Session 27's final validation, on 2 GPUs, in two calls (the carried tree's 64 MiB holds one
# half of the binaries at a time): every GPU test binary this session's code reaches.
#   part A: test_kernels_gpu on GPU 1 (the masked tile plan, the absorb kernels' shared q_pe copy)
#     beside test_moe_gpu, test_model_gpu and the A/B of the shared expert's padding rows on GPU 0
#     (moe_decode_bench at one rank, the previous binary *_old: main e3b90c1), then the same A/B
#     at two ranks;
#   part B: test_serve_gpu (one GPU over the low-latency form, ServeGpu.OneGpuLowLatencyDecoding
#     KeepsTheText; the four-rank test skips on two), test_comm_gpu's MoeLayer* (MoeLayerApiBackward
#     .ForwardOnlyLayerGivesTheTrainingForwardsBits) and test_train_gpu, on both GPUs.
# Calls: run(kind="nvidia-h100-x2", carry=["build-s27/binsA.tar.xz", "build-bundle/lib"],
#            command="bash scripts/device_final_s27.sh A", timeout_s=600)
#        run(kind="nvidia-h100-x2", carry=["build-s27/binsB.tar.xz", "build-bundle/lib"],
#            command="bash scripts/device_final_s27.sh B", timeout_s=600)
set -uo pipefail
part=${1:?part A or B}
bin=build-s27/bin$part archive=build-s27/bins$part.tar.xz name=final_s27_$part
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]" "$1" | head -12; }
run_on() {  # run_on GPU binary [filter]
  local gpu=$1 t=$2 filter=${3:-*}
  CUDA_VISIBLE_DEVICES=$gpu timeout 400 "$bin/$t" --gtest_filter="$filter" > "$R/$t.log" 2>&1
  echo "$t (GPU $gpu) rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
}
ab() {  # ab RANKS TOKENS GPUS
  for v in moe_decode_bench_old moe_decode_bench moe_decode_bench_old moe_decode_bench; do
    CUDA_VISIBLE_DEVICES=$3 timeout 60 "$bin/$v" --ranks "$1" --shapes small-gpu,v3-slice,v3 \
      --tokens "$2" --iters 5 --date "$d" --out "$R/$v.$1rank.jsonl" > "$R/bench_$v.$1rank.log" 2>&1
    echo "$v --ranks $1 rc=$? ($(($(date +%s) - t0)) s)" >> "$R/rc.txt"
  done
}
if [[ $part == A ]]; then
  run_on 1 test_kernels_gpu &
  { run_on 0 test_moe_gpu; run_on 0 test_model_gpu; ab 1 1,8,64,128 0; }
  wait
  pack
  ab 2 1,8,64 0,1
  tests="test_kernels_gpu test_moe_gpu test_model_gpu"
else
  run_on 0,1 test_serve_gpu
  run_on 0,1 test_comm_gpu 'MoeLayer*'
  run_on 0,1 test_train_gpu
  tests="test_serve_gpu test_comm_gpu test_train_gpu"
fi
cat "$R/rc.txt"
for t in $tests; do
  echo "== $t"
  summary "$R/$t.log"
done
for f in "$R"/bench_*.log; do
  [[ -e $f ]] || continue
  echo "== $(basename "$f")"
  grep -E "^(shape|small|v3)" "$f" | head -13
done
gzip -f "$R"/test_*.log
pack
el done
