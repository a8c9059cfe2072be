#!/usr/bin/env bash
# Session 23 call 2: the GPU decoding path — kernels (MlaDecodeGpu* with the fixed-split plan,
# MlaAbsorbGpu*), the serve tests (ModelGpu::decode against the CPU model, the generator's batch
# invariance), the model tests touched (MlaBlockGpu*, DecoderLayerGpu*, ModelGpu*), then
# mla_decode_bench.
# Call: run(carry=["build-s23/bins2.tar.xz"], command="bash docs/kernels/runs/s23-call2.sh", timeout_s=420)
set -uo pipefail
bin=build-s23/bin2 archive=build-s23/bins2.tar.xz name=s23_c2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/$bin/lib:$LD_LIBRARY_PATH
timeout 120 "$bin/test_kernels_gpu" --gtest_filter='MlaDecodeGpu*:MlaAbsorbGpu*' > "$R/kernel_tests.log" 2>&1
el "1. MlaDecodeGpu*:MlaAbsorbGpu* rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|fixed splits|Expected|Which is|differs" "$R/kernel_tests.log" | cut -c1-160 | head -30
timeout 150 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "2. test_serve_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|serve \]|Expected|Which is|prompt|what" "$R/serve_tests.log" | cut -c1-200 | head -40
pack
timeout 200 "$bin/test_model_gpu" --gtest_filter='MlaBlockGpu*:DecoderLayerGpu*:ModelGpu*' > "$R/model_tests.log" 2>&1
el "3. model tests rc=$?"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/model_tests.log" | head -20
pack
timeout 100 "$bin/mla_decode_bench" --date "$d" --commit "${FP8MOE_COMMIT:-s23-c2}" --out "$R/mla_decode.jsonl" > "$R/mla_decode_bench.log" 2>&1
el "4. mla_decode_bench rc=$?"; head -30 "$R/mla_decode_bench.log"
pack
el done
