#!/usr/bin/env bash
# Session 25 call 11: the per-head products on tensor cores (src/kernels/mla_absorb_tc.cu, used by
# MlaBlockGpu's decoding path) — MlaAbsorbGpu* (the _tc forms within rounding of the reference),
# mla_absorb_bench (against the CUDA-core forms), test_serve_gpu and test_model_gpu (decoding
# within the recipe's noise of the CPU model; batch invariance and batched prefill bit for bit on
# the GPU), serve_bench as call 10 (same commands) for before / after.
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins11.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call11.sh", timeout_s=300)
set -uo pipefail
bin=build-s25/bin11 archive=build-s25/bins11.tar.xz name=s25_c11
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|absorb_tc|rel " "$1" | head -24; }
timeout 60 "$bin/test_kernels_gpu" --gtest_filter='MlaAbsorb*' > "$R/test_kernels_absorb.log" 2>&1
el "1. MlaAbsorb* rc=$?"; summary "$R/test_kernels_absorb.log"
CUDA_VISIBLE_DEVICES=1 timeout 60 "$bin/mla_absorb_bench" --out "$R/mla_absorb.jsonl" --date "$d" > "$R/mla_absorb_bench.log" 2>&1 &
timeout 120 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "2. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
wait
el "3. mla_absorb_bench"; cat "$R/mla_absorb_bench.log"
pack
export CUDA_VISIBLE_DEVICES=0
timeout 60 "$bin/test_model_gpu" > "$R/test_model_gpu.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 60 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,16,64 --date "$d" \
  --out "$R/serve.jsonl" > "$R/bench_decode.log" 2>&1
el "4. serve_bench rc=$?"; cat "$R/bench_decode.log"
CUDA_VISIBLE_DEVICES=1 timeout 60 "$bin/serve_bench" --prefill-batch 8 --configs small-gpu,v3-slice --batches 32 \
  --prompt 512 --new 16 --date "$d" --out "$R/serve_prefill.jsonl" > "$R/bench_p512.log" 2>&1
el "5. serve_bench --prefill-batch 8 prompt 512 rc=$?"; cat "$R/bench_p512.log"
wait
el "6. test_model_gpu"; summary "$R/test_model_gpu.log"
gzip -f "$R"/test_*.log
pack
el done
