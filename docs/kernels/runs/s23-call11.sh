#!/usr/bin/env bash
# Session 23 call 11: after the duplicate folds (mla_decode's shared key range and row store,
# MlaBlockGpu::project, DecoderLayerGpu::ffn_forward): MlaDecodeGpu*, test_model_gpu,
# test_serve_gpu, test_train_gpu (one GPU: its several-GPU tests skip).
# Call: run(carry=["build-s23/bins11.tar.xz", "build-bundle/lib"], command="bash docs/kernels/runs/s23-call11.sh", timeout_s=400)
set -uo pipefail
bin=build-s23/bin11 archive=build-s23/bins11.tar.xz name=s23_c11
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
for t in "test_kernels_gpu --gtest_filter=MlaDecodeGpu*:MlaAbsorbGpu*" test_model_gpu test_serve_gpu test_train_gpu; do
  tname=${t%% *}
  # shellcheck disable=SC2086
  timeout 300 "$bin/"$t > "$R/$tname.log" 2>&1
  el "$tname rc=$?"; grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure" "$R/$tname.log" | head -8
done
pack
el done
