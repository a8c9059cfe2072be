#!/usr/bin/env bash
# Session 25 call 10: the absorb / unabsorb kernels over token slices (src/kernels/mla_absorb.cu) —
# MlaAbsorbGpu* bit for bit at prefill sizes, MlaDecode*, test_model_gpu, test_serve_gpu (texts
# unchanged), then serve_bench on one GPU: decoding (the main table) and --prefill-batch 8 against
# one prompt a pass, the same commands as session 25's calls 1 and 6 for before / after.
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins10.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call10.sh", timeout_s=480)
set -uo pipefail
bin=build-s25/bin10 archive=build-s25/bins10.tar.xz name=s25_c10
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]" "$1" | head -12; }
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='MlaAbsorb*:MlaDecode*' > "$R/test_kernels_mla.log" 2>&1
el "1. MlaAbsorb* MlaDecode* rc=$?"; summary "$R/test_kernels_mla.log"
for t in serve model; do
  timeout 200 "$bin/test_${t}_gpu" > "$R/test_${t}_gpu.log" 2>&1
  el "2. test_${t}_gpu rc=$?"; summary "$R/test_${t}_gpu.log"
done
pack
export CUDA_VISIBLE_DEVICES=0
timeout 150 "$bin/serve_bench" --configs small-gpu,v3-slice --batches 1,16,64 --date "$d" \
  --out "$R/serve.jsonl" > "$R/bench_decode.log" 2>&1
el "3. serve_bench rc=$?"; cat "$R/bench_decode.log"
pack
for p in 128 512; do
  timeout 150 "$bin/serve_bench" --prefill-batch 8 --configs small-gpu,v3-slice --batches 8,32 --prompt "$p" \
    --new 16 --date "$d" --out "$R/serve_prefill.jsonl" > "$R/bench_p$p.log" 2>&1
  el "4. serve_bench --prefill-batch 8 prompt $p rc=$?"; cat "$R/bench_p$p.log"
  pack
done
el done
