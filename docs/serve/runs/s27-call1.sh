#!/usr/bin/env bash
# Session 27 call 1: the masked GEMMs' tiles chosen for the expected rows plus their spread
# (kernels::gemm_masked_plan_rows: mean + ceil(2 sqrt(mean))), so a mean of 64 rows an expert takes
# 128-row tiles. Tests: Fp8GemmGpu.Grouped* and MlaAbsorbGpu* (the absorb kernels' shared q_pe
# copy), MoeLayerApi* (masked == grouped bit for bit), test_serve_gpu (the tests' shared sampling
# options). A/B in the same call: moe_decode_bench and serve_bench --low-latency-ab, the previous
# binaries (*_old, main d11c1aa) against this build, alternated.
# Call: run(kind="nvidia-h100-x2", carry=["build-s27/bins1.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s27-call1.sh", timeout_s=600)
set -uo pipefail
bin=build-s27/bin1 archive=build-s27/bins1.tar.xz name=s27_c1
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|values differ|SKIPPED" "$1" | head -30; }
CUDA_VISIBLE_DEVICES=1 timeout 150 "$bin/test_kernels_gpu" --gtest_filter='Fp8GemmGpu.Grouped*:MlaAbsorbGpu*' > "$R/test_kernels.log" 2>&1 &
timeout 150 "$bin/test_comm_gpu" --gtest_filter='MoeLayerApi*' > "$R/test_comm_moe_layer_api.log" 2>&1
el "1b. test_comm_gpu MoeLayerApi* rc=$?"; summary "$R/test_comm_moe_layer_api.log"
wait
el "1a. test_kernels_gpu"; summary "$R/test_kernels.log"
pack
for v in moe_decode_bench_old moe_decode_bench moe_decode_bench_old moe_decode_bench; do
  timeout 100 "$bin/$v" --shapes small-gpu,v3-slice,v3 --tokens 32,64,128 --iters 5 --date "$d" \
    --out "$R/$v.jsonl" > "$R/bench_$v.log" 2>&1
  el "2. $v rc=$?"; grep -E "^\|" "$R/bench_$v.log" | head -14
done
pack
for v in serve_bench_old serve_bench; do
  timeout 150 "$bin/$v" --devices 0,1 --low-latency-ab 1 --rounds 2 --configs v3-slice,small-gpu \
    --batches 64,128 --date "$d" --out "$R/$v.jsonl" > "$R/bench_$v.log" 2>&1
  el "3. $v --low-latency-ab rc=$?"; grep -E "^\||low.latency" "$R/bench_$v.log" | head -12
done
pack
timeout 240 "$bin/test_serve_gpu" > "$R/test_serve_gpu.log" 2>&1
el "4. test_serve_gpu rc=$?"; summary "$R/test_serve_gpu.log"
gzip -f "$R"/test_*.log
pack
el done
