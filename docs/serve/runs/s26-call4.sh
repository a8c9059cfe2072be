#!/usr/bin/env bash
# Session 26 call 4: the masked GEMMs' tile lookup from a cursor (sm90::kModeMaskedCursor: new
# instantiations 64x64, 64x128, 128x128 for the masked form; every other kernel byte for byte the
# same, tools/cubin_same_code.py). Fp8GemmGpu.Grouped* (GroupedMaskedManyGroups: 70 groups,
# cursor kernels forced and picked), ExpertFfn*, MoeLayerApi*, test_serve_gpu, moe_decode_bench
# (normal / LL masked / LL contiguous), serve_bench --low-latency-ab, and gemm_bench --only masked
# with the previous binary (gemm_bench_old) and this one on GPU 0 (the masked shapes).
# Call: run(kind="nvidia-h100-x2", carry=["build-s26/bins4.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s26-call4.sh", timeout_s=600)
set -uo pipefail
bin=build-s26/bin4 archive=build-s26/bins4.tar.xz name=s26_c4
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|values differ|low-latency|low_latency|graph replays|contiguous GEMMs|grouped_masked|SKIPPED" "$1" | head -40; }
CUDA_VISIBLE_DEVICES=1 timeout 150 "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGpu.Grouped*' > "$R/test_kernels_grouped.log" 2>&1 &
CUDA_VISIBLE_DEVICES=0 timeout 150 "$bin/test_moe_gpu" --gtest_filter='ExpertFfn*' > "$R/test_moe_ffn.log" 2>&1
el "1b. test_moe_gpu ExpertFfn* rc=$?"; summary "$R/test_moe_ffn.log"
wait
el "1a. test_kernels_gpu Fp8GemmGpu.Grouped*"; summary "$R/test_kernels_grouped.log"
timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/test_comm_moe_layer_api.log" 2>&1
el "2. test_comm_gpu MoeLayerApi* rc=$?"; summary "$R/test_comm_moe_layer_api.log"
pack
timeout 240 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "3. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
pack
timeout 200 "$bin/moe_decode_bench" --date "$d" --out "$R/moe_decode.jsonl" > "$R/bench_moe_decode.log" 2>&1
el "4. moe_decode_bench rc=$?"; cat "$R/bench_moe_decode.log"
pack
timeout 200 "$bin/serve_bench" --devices 0,1 --low-latency-ab 1 --rounds 3 --configs small-gpu,v3-slice \
  --batches 1,8,32,64 --date "$d" --out "$R/serve_ll_ab.jsonl" > "$R/bench_ll_ab.log" 2>&1
el "5. serve_bench --low-latency-ab rc=$?"; cat "$R/bench_ll_ab.log"
pack
for v in gemm_bench_old gemm_bench gemm_bench_old gemm_bench; do
  CUDA_VISIBLE_DEVICES=0 timeout 60 "$bin/$v" --only masked --out "$R/gemm_masked_$v.jsonl" > "$R/bench_$v.log" 2>&1
  el "6. $v --only masked rc=$?"; grep -iE "masked|fp8moe|cublas" "$R/bench_$v.log" | head -12
done
gzip -f "$R"/test_*.log
pack
el done
