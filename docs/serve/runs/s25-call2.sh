#!/usr/bin/env bash
# Session 25 call 2: redundant experts at serving time — the map kernel against its reference,
# test_serve_gpu (RedundantExperts: one GPU bit for bit, two GPUs over EPLB's plan of their own
# load, refusals) and every other serving test; test_model_gpu and test_train_gpu after the
# DecoderLayerGpu / ModelGpu changes (the expert load's running total, the kept experts per layer).
# Call: run(kind="nvidia-h100-x2", carry=["build-s25/bins2.tar.xz", "build-bundle/lib"],
#           command="bash docs/serve/runs/s25-call2.sh", timeout_s=420)
set -uo pipefail
bin=build-s25/bin2 archive=build-s25/bins2.tar.xz name=s25_c2
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
summary() { grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|SKIPPED \] [0-9]|\[ (eplb|map) \]" "$1" | head -20; }
timeout 60 "$bin/test_moe_gpu" --gtest_filter='ExpertPlacement*' > "$R/moe_tests.log" 2>&1
el "1. test_moe_gpu ExpertPlacement* rc=$?"; summary "$R/moe_tests.log"
timeout 200 "$bin/test_serve_gpu" > "$R/serve_tests.log" 2>&1
el "2. test_serve_gpu rc=$?"; summary "$R/serve_tests.log"
pack
timeout 120 "$bin/test_model_gpu" > "$R/model_tests.log" 2>&1
el "3. test_model_gpu rc=$?"; summary "$R/model_tests.log"
pack
timeout 240 "$bin/test_train_gpu" > "$R/train_tests.log" 2>&1
el "4. test_train_gpu rc=$?"; summary "$R/train_tests.log"
pack
el done
