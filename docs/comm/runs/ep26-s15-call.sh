#!/usr/bin/env bash
# Session 15, ep26: the combine's own chunk size (DeviceEpOptions::combine_chunk_tokens, ep_bench
# suffix :mN; 0 = chunk_tokens' value, so the defaults are unchanged). Today's lead sweep moved the
# BF16 combine by -6 % with :c8 (both dispatch and combine chunks 8, 2 x H200) while the dispatch
# lost +4 % and the layout-only dispatch +14.5 %: :m8 should keep the combine's gain alone.
# Binaries: branch ep26 on d3ac55a (its uncommitted diff), `cmake --build build-bundle --target
# test_comm_gpu ep_bench`, stripped and xz-packed into build-ep26/bins.tar.xz (BUILD_INFO.txt).
# Call: run(kind="nvidia-h100-x2", carry=["build-ep26"], command="bash build-ep26/run.sh")
#   1. the new tests (*Session15*) and the unset path's (MatchesReferenceFp8AllGpus, the bulk
#      send's graph replay) under a timeout; a failure times default and default:c8 only;
#   2. ep_bench --ab default,default:m4,default:m6,default:m8,default:m12,default:c8,
#      default:m8:g48,default:m8:g80, two processes x 3 rounds (V3 shape, 64 blocks, chunk 16).
# Predictions: docs/comm/README.md "Session 15: the combine's own chunk size (ep26)".
# One archive back: $OUT/ep26_call.tgz.
set -uo pipefail
bin=build-ep26/bin archive=build-ep26/bins.tar.xz name=ep26_call
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh  # run from the repository root
export CUDA_VISIBLE_DEVICES=0,1
timeout 150 "$bin/test_comm_gpu" \
  --gtest_filter='*Session15*:NvlinkTest.MatchesReferenceFp8AllGpus:*Session13BulkRowsGraphCapturedRoundReplays' \
  > "$R/tests.log" 2>&1
rc=$?
el "1. tests rc=$rc"; grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]|^\[       OK \]" "$R/tests.log"
pack
variants=default,default:m4,default:m6,default:m8,default:m12,default:c8,default:m8:g48,default:m8:g80
# A failing variant is not timed: a failure times the defaults and the control only.
[[ $rc -ne 0 ]] && variants=default,default:c8 && echo "tests failed: m not timed"
COMMON="--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4"
for i in 1 2; do
  # shellcheck disable=SC2086 # COMMON is a list of arguments
  timeout 120 "$bin/ep_bench" --ab "$variants" --ab-rounds 3 $COMMON \
    --out "$R/ab_$i.jsonl" --date "$d" > "$R/ab_$i.log" 2>&1
  el "2. ab $i rc=$?"; grep -E "^# ab normal" "$R/ab_$i.log"
  pack
done
el "done"
