#!/usr/bin/env bash
# Session 20 call (s20-dv): the FP8 quantisers' x / scale without a division per element
# (include/fp8moe/fp8/exact_quotient.h; docs/kernels/quantize.md, "Exact quotient without
# division", has the CPU proof and PREDICTIONS). The codes must be bit for bit the old ones.
#   1. test_kernels_gpu '*Quantiz*:Requant*:*Swiglu*' (timeout 120)
#   2. test_moe_gpu, all (timeout 120): ExpertFfn forward/backward use the quantisers
#   3. test_comm_gpu '*Fp8*:*Dispatch*:ForwardTest.Nodes*:NvlinkTest.*MatchReference*:NvlinkTest.*MatchesReference*'
#      (timeout 150, 2 GPUs): the EP FP8
#      payload (quantize16) against the CPU reference bit for bit (normal, LL, forward route)
#   4. quantize_bench: dv, base (main 0495ef5's kernels, same bench source), dv again (timeout 45 each)
#   5. swiglu_bench: dv, base (timeout 30 each)
# Binaries: build-dv/bins.tar.xz (stripped; BUILD_INFO.txt). Copy: docs/kernels/runs/s20-dv-call.sh.
# Call: run(kind="nvidia-h200-x2", carry=["build-dv"], command="bash build-dv/run.sh",
#           timeout_s=600); one archive back: $OUT/s20_dv.tgz.
set -uo pipefail
bin=build-dv/bin archive=build-dv/bins.tar.xz name=s20_dv
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
head -3 "$R/machine.txt"
cp build-dv/BUILD_INFO.txt "$R/" 2> /dev/null
commit=$(sed -n 's/^commit: //p' build-dv/BUILD_INFO.txt 2> /dev/null | head -1)
show() { grep -E "^\[  (PASSED|FAILED)|FAILED  \]|Failure|Skipped|^\[==========\] [0-9]+ tests" "$1" | head -"${2:-20}"; }
CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/test_kernels_gpu" \
  --gtest_filter='*Quantiz*:Requant*:*Swiglu*' > "$R/test_kernels.log" 2>&1
el "1. test_kernels_gpu *Quantiz*:Requant*:*Swiglu* rc=$?"
show "$R/test_kernels.log"
pack
CUDA_VISIBLE_DEVICES=0 timeout 120 "$bin/test_moe_gpu" > "$R/test_moe.log" 2>&1
el "2. test_moe_gpu rc=$?"
show "$R/test_moe.log"
pack
timeout 150 "$bin/test_comm_gpu" --gtest_filter='*Fp8*:*Dispatch*:ForwardTest.Nodes*:NvlinkTest.*MatchReference*:NvlinkTest.*MatchesReference*' \
  > "$R/test_comm.log" 2>&1
el "3. test_comm_gpu FP8 payload filter rc=$?"
show "$R/test_comm.log" 30
pack
export CUDA_VISIBLE_DEVICES=0
for v in dv base dv2; do
  b=quantize_bench
  [[ $v == base ]] && b=quantize_bench_base
  timeout 45 "$bin/$b" --out "$R/quantize_$v.jsonl" --date "$d" --commit "${commit:-unknown}-$v" \
    > "$R/quantize_bench_$v.log" 2>&1
  el "4. $b ($v) rc=$?"
  pack
done
for v in dv base; do
  b=swiglu_bench
  [[ $v == base ]] && b=swiglu_bench_base
  timeout 30 "$bin/$b" --out "$R/swiglu_$v.jsonl" --date "$d" --commit "${commit:-unknown}-$v" \
    > "$R/swiglu_bench_$v.log" 2>&1
  el "5. $b ($v) rc=$?"
  pack
done
# One line per quantize row: us of base, dv, dv2.
python3 - "$R" << 'PY' 2> /dev/null
import json, sys, os
r = sys.argv[1]
def rows(f):
    p = os.path.join(r, f)
    if not os.path.exists(p): return {}
    out = {}
    for l in open(p):
        try: j = json.loads(l)
        except ValueError: continue
        k = tuple(str(j.get(x)) for x in ("kernel", "impl", "rows", "cols", "pow2", "op", "shape"))
        out[k] = j.get("us", j.get("fused_us"))
    return out
for pre in ("quantize", "swiglu"):
    b, a, a2 = rows(pre + "_base.jsonl"), rows(pre + "_dv.jsonl"), rows(pre + "_dv2.jsonl")
    for k in sorted(set(a) | set(b), key=str):
        print(pre, " ".join(x for x in k if x != "None"), "base", b.get(k), "dv", a.get(k), "dv2", a2.get(k))
PY
el done
