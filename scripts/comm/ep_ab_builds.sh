#!/usr/bin/env bash
# On a lent GPU machine: the same ep_bench variant A/B with several builds of ep_bench, the
# processes alternated (A B A B ...) so that clock and host drift fall on every build alike.
# For a regression between two commits: build ep_bench at each here (bash scripts/gpu_bundle.sh
# in a worktree), copy the binaries into one carried folder, and run e.g.
#   BUILDS="old=build-x/ep_bench_adcad14 new=build-x/ep_bench_head" AB="default,PCBDL,PCBDLQ,PCBDLY" \
#     GPUS=0,1 bash scripts/comm/ep_ab_builds.sh
# Env: BUILDS (name=path ...), AB (ep_bench --ab list; AB_<name> overrides it for one build, e.g.
# an older build that does not know a newer letter), GPUS (CUDA_VISIBLE_DEVICES, default all),
# PROCS (processes per build, default 2), ROUNDS (--ab-rounds per process, default 2), SWEEP=1
# also runs each build's plain sweep (the defaults, as scripts/comm/ep_device_suite.sh does).
# Outputs under $OUT: ab_<name>_<i>.{log,jsonl}, sweep_<name>_<i>.{log,jsonl}.
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
[[ -n ${GPUS:-} ]] && export CUDA_VISIBLE_DEVICES=$GPUS
out=${OUT:-/tmp/ep_ab_builds}
mkdir -p "$out"
nvidia-smi -L > "$out/machine.txt" 2>&1
common=(--blocks 64 --chunks 16 --ll-blocks 64 --ll-chunks 4 --date "$(date -u +%F)")
for ((i = 1; i <= ${PROCS:-2}; ++i)); do
  for spec in ${BUILDS:?set BUILDS=\"name=path ...\"}; do
    name=${spec%%=*} bin=${spec#*=}
    ab_var=AB_$name
    ab=${!ab_var:-${AB:-}}
    if [[ -n $ab ]]; then
      timeout 200 "$bin" --ab "$ab" --ab-rounds "${ROUNDS:-2}" "${common[@]}" --commit "$name" \
        --out "$out/ab_${name}_$i.jsonl" > "$out/ab_${name}_$i.log" 2>&1
      echo "$name ab $i rc=$?"
      grep -E "^# ab " "$out/ab_${name}_$i.log" | head -20
    fi
    if [[ ${SWEEP:-0} == 1 ]]; then
      timeout 200 "$bin" "${common[@]}" --commit "$name" --out "$out/sweep_${name}_$i.jsonl" \
        > "$out/sweep_${name}_$i.log" 2>&1
      echo "$name sweep $i rc=$?"
      grep -E "^normal +(dispatch|combine) " "$out/sweep_${name}_$i.log" | head -4
    fi
  done
done
