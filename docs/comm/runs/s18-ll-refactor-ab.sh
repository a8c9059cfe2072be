#!/usr/bin/env bash
# Session 18: the low-latency A/B of two builds of ep_bench, processes alternated (A B A B ...):
# "ref" = the bundle's ep_bench (main with ll5's ids block the default and the receive's record
# copy in one function, copy_record_steps: dev/comm/ll3/copy_record_steps.patch), "noref" = the
# same tree without that refactor (build-s18/noref.tar.xz). The refactor changes the receive
# kernels' PTX only (register allocation); predicted: equal within +-0.3 us on every row.
# Variants: new (I, the default), newB (V: the ids from send block 0, session 17's default), newS
# (the sender's plan, session 16's path). Run after scripts/device_full_validation.sh in the same
# call, from the repository root, with build-bundle/bins.tar.xz and build-s18 carried.
set -uo pipefail
bin=build-bundle/bin archive=build-bundle/bins.tar.xz name=ll_refactor_ab
# shellcheck source=scripts/device_call_prologue.sh
source scripts/device_call_prologue.sh
mkdir -p build-s18/bin && tar xJf build-s18/noref.tar.xz -C build-s18/bin
export CUDA_VISIBLE_DEVICES=0,1
for i in 1 2 3; do
  for b in ref noref; do
    exe=$bin/ep_bench
    [[ $b == noref ]] && exe=build-s18/bin/ep_bench_noref
    extra=()
    ((i == 3)) && extra=(--ll-graph 8)
    timeout 40 "$exe" --ab-ll 6 --ll-blocks 64 --ll-chunks 4 --iters 30 --ll-variants new,newB,newS \
      "${extra[@]}" --commit "$b" --out "$R/ll_${b}_$i.jsonl" --date "$d" > "$R/ll_${b}_$i.log" 2>&1
    el "$b $i rc=$?"
    grep -E "^# ab_ll|^# ll_graph" "$R/ll_${b}_$i.log" | sed "s/^/$b /" | head -8
    pack
  done
done
el done
