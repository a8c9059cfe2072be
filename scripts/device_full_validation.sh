#!/usr/bin/env bash
# One device call that validates everything GPU-side on a machine of 2 or more GPUs, with the
# binaries of `bash scripts/gpu_bundle.sh` carried as build-bundle/bin or, packed, as
# build-bundle/bins.tar.xz. Three phases, so that the
# correctness runs share the machine and the timings do not share a GPU:
#   1. test_comm_gpu on every GPU, beside the other test_*_gpu binaries on the last GPU; then the
#      trainer's several-GPU tests on every GPU
#   2. the EP suite's benches on GPUs 0 and 1 (A/B of FULL_AB if set, the defaults), beside
#      gemm_bench on the last GPU (FULL_GEMM_BENCH=0 skips it) when there are 3 or more GPUs
#      (else after them)
#   2b. with FULL_PREV_EP="name=path ..." (ep_bench binaries of earlier builds, carried too), the
#      same-call A/B of those builds against this one's ep_bench on GPUs 0 and 1 (defaults,
#      processes alternated: scripts/comm/ep_ab_builds.sh), so that a regression of the merged
#      tree shows up in the run that validates it
#   2c. with FULL_NVLINK="<nvlink_bench arguments>", the NVLink transport bench on GPUs 0 and 1
#   2d. with FULL_MOE_FORWARD="<moe_forward_bench arguments>", the forward up to the expert GEMM
#      (expanded against gathered path) on GPUs 0 and 1
#   3. with 4 or more GPUs, the EP suite's benches on every GPU (A/B of FULL_AB_ALL if set, the
#      defaults; the two-stage route if FULL_XNODE is set, e.g. "2")
# Outputs: $OUT/tests.tgz (test logs), $OUT/x2/ep_suite.tgz, $OUT/xN/ep_suite.tgz, $OUT/gemm.tgz,
# $OUT/prev_ab.tgz, $OUT/nvlink.tgz, $OUT/moe_forward.tgz: seven files, under the device's limit
# of 8 per call.
# gemm_bench rows carry the SM clock; when it ran beside the EP benches, compare its ratios (ours /
# cuBLASLt of the same run), not its absolute times, with runs on an idle host. FP8MOE_COMMIT
# names the build in every row. NCCL_NVLS_ENABLE=0 throughout.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
out=${OUT:-/tmp/full_validation}
mkdir -p "$out"
bin=build-bundle/bin
if [[ ! -x $bin/test_comm_gpu && -f build-bundle/bins.tar.xz ]]; then  # carried packed
  mkdir -p "$bin" && tar xJf build-bundle/bins.tar.xz -C "$bin"
fi
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
# The Debian shared libraries the tests link beyond the device's own (SentencePiece for the
# trainer's tests; scripts/gpu_bundle.sh copies them).
[[ -d build-bundle/lib ]] && export LD_LIBRARY_PATH=$PWD/build-bundle/lib:$LD_LIBRARY_PATH
gpus=$(nvidia-smi -L | grep -c '^GPU')
last=$((gpus - 1))
logs=$(mktemp -d)
t0=$(date +%s)
el() { echo $(($(date +%s) - t0)); }
summary() {  # summary LOG: the gtest verdict lines and the failures
  grep -hE "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure|runs differ from the first$" "$1" |
    grep -v " 0 of " | head -20
}

# FULL_PHASES=1 runs phase 1 alone, FULL_PHASES=2 the rest alone: the whole validation passed the
# device's 600 s per call on 2 x H100 in session 14, so it is two calls on one warm machine there.
phases=${FULL_PHASES:-12}
# FULL_TEST_SHARD="i/n" runs gtest's shard i of n of test_comm_gpu (its environment only) and the
# GEMM tests with shard 0 alone: phase 1 as n calls when test_comm_gpu alone passes ~540 s.
shard=${FULL_TEST_SHARD:-0/1}
shard_i=${shard%%/*} shard_n=${shard##*/}
if [[ $phases == *1* ]]; then
echo "== [$(el) s] phase 1: test_comm_gpu (shard $shard) on $gpus GPUs, GEMM tests on GPU $last"
gemm_tests=
if ((shard_i == 0)); then
  (
    # Every other module's GPU tests (kernels, moe, model, train, ...), one after the other.
    for t in $(cd "$bin" && ls test_*_gpu | grep -vx test_comm_gpu); do
      # NOTE: 300 s cut test_kernels_gpu off in session 21 (64 tests, ~310 s beside test_comm_gpu).
      CUDA_VISIBLE_DEVICES=$last timeout "${FULL_OTHER_TIMEOUT:-450}" stdbuf -oL "$bin/$t" \
        > "$logs/$t.log" 2>&1
      echo "$t rc=$?" >> "$logs/rc.txt"
    done
  ) &
  gemm_tests=$!
fi
GTEST_TOTAL_SHARDS=$shard_n GTEST_SHARD_INDEX=$shard_i timeout "${FULL_TEST_TIMEOUT:-300}" \
  stdbuf -oL "$bin/test_comm_gpu" > "$logs/test_comm_gpu.log" 2>&1
echo "test_comm_gpu rc=$?" >> "$logs/rc.txt"
[[ -n $gemm_tests ]] && wait "$gemm_tests"
# The trainer's several-GPU tests need every GPU (the loop above gave test_train_gpu one, where
# they skip): after test_comm_gpu, on all of them.
if ((shard_i == 0 && gpus >= 2)) && [[ -x $bin/test_train_gpu ]]; then
  timeout "${FULL_OTHER_TIMEOUT:-450}" stdbuf -oL "$bin/test_train_gpu" \
    --gtest_filter='TrainerGpuParallel*' > "$logs/test_train_gpu_parallel.log" 2>&1
  echo "test_train_gpu TrainerGpuParallel* ($gpus GPUs) rc=$?" >> "$logs/rc.txt"
fi
tar czf "$out/tests.tgz" -C "$logs" .
cat "$logs/rc.txt"
for t in $(cd "$bin" && ls test_*_gpu) test_train_gpu_parallel; do
  [[ -f $logs/$t.log ]] && { echo "-- $t"; summary "$logs/$t.log"; }
done
fi
[[ $phases == *2* ]] || { echo "== [$(el) s] done (phase 1 only)"; exit 0; }

echo "== [$(el) s] phase 2: EP benches on GPUs 0,1; gemm_bench on GPU $last"
gemm_dir=$(mktemp -d)
gemm_bench() {
  CUDA_VISIBLE_DEVICES=$last timeout 300 "$bin/gemm_bench" --out "$gemm_dir/gemm.jsonl" \
    > "$gemm_dir/gemm_bench.log" 2>&1
  echo "gemm_bench rc=$?" > "$gemm_dir/rc.txt"
  tar czf "$out/gemm.tgz" -C "$gemm_dir" .
}
bench_pid=
if [[ ${FULL_GEMM_BENCH:-1} == 1 ]] && ((gpus >= 3)); then
  gemm_bench &
  bench_pid=$!
fi
OUT=$out/x2 CUDA_VISIBLE_DEVICES=0,1 SUITE_COMM_TESTS=0 SUITE_GEMM=0 SUITE_AB=${FULL_AB:-} \
  SUITE_XNODE=${FULL_XNODE2:-none} bash scripts/comm/ep_device_suite.sh
if [[ -n $bench_pid ]]; then
  wait $bench_pid
elif [[ ${FULL_GEMM_BENCH:-1} == 1 ]]; then
  gemm_bench
fi
cat "$gemm_dir/rc.txt" 2> /dev/null
grep -E "^dense +fp8moe +m=" "$gemm_dir/gemm_bench.log" 2> /dev/null |
  awk '{print $3, $4, $5, $7, $8, $13, $14, $NF}' | head -20
grep -E "^(grouped_contiguous|grouped_masked|wgrad|kgrouped_wgrad) " "$gemm_dir/gemm_bench.log" 2> /dev/null |
  awk '{print $1, $2, $3, $4, $5, $6, $9, $10}' | head -12

if [[ -n ${FULL_PREV_EP:-} ]]; then
  echo "== [$(el) s] phase 2b: ep_bench A/B against earlier builds on GPUs 0,1"
  prev_dir=$(mktemp -d)
  OUT=$prev_dir BUILDS="$FULL_PREV_EP now=$bin/ep_bench" AB=default PROCS=${FULL_PREV_PROCS:-1} GPUS=0,1 \
    bash scripts/comm/ep_ab_builds.sh 2>&1 | grep -E "rc=|normal +(dispatch|combine) "
  # One archive: the device returns at most 8 files per call (session 6 lost the suites' ones).
  tar czf "$out/prev_ab.tgz" -C "$prev_dir" .
fi

if [[ -n ${FULL_NVLINK:-} ]]; then
  # FULL_NVLINK holds nvlink_bench's arguments (e.g. "--quick"): the transport's ceiling on this
  # host, the copy engine timed in the same run (docs/comm/README.md, session 8).
  echo "== [$(el) s] phase 2c: nvlink_bench $FULL_NVLINK on GPUs 0,1"
  nv_dir=$(mktemp -d)
  # shellcheck disable=SC2086 # FULL_NVLINK is a list of arguments
  CUDA_VISIBLE_DEVICES=0,1 timeout 240 "$bin/nvlink_bench" $FULL_NVLINK --out "$nv_dir/nvlink.jsonl" \
    --date "$(date -u +%F)" ${FP8MOE_COMMIT:+--commit "$FP8MOE_COMMIT"} > "$nv_dir/nvlink_bench.log" 2>&1
  echo "nvlink_bench rc=$?"
  sed -n '/^# summary/,$p' "$nv_dir/nvlink_bench.log" | head -40
  tar czf "$out/nvlink.tgz" -C "$nv_dir" .
fi

if [[ -n ${FULL_MOE_FORWARD:-} ]]; then
  echo "== [$(el) s] phase 2d: moe_forward_bench $FULL_MOE_FORWARD on GPUs 0,1"
  mf_dir=$(mktemp -d)
  # shellcheck disable=SC2086 # FULL_MOE_FORWARD is a list of arguments
  CUDA_VISIBLE_DEVICES=0,1 timeout 150 "$bin/moe_forward_bench" $FULL_MOE_FORWARD \
    --out "$mf_dir/moe_forward.jsonl" --date "$(date -u +%F)" \
    ${FP8MOE_COMMIT:+--commit "$FP8MOE_COMMIT"} > "$mf_dir/moe_forward_bench.log" 2>&1
  echo "moe_forward_bench rc=$?"
  grep -v "^round" "$mf_dir/moe_forward_bench.log" | tail -12
  tar czf "$out/moe_forward.tgz" -C "$mf_dir" .
fi

if ((gpus >= 4)); then
  echo "== [$(el) s] phase 3: EP benches on $gpus GPUs"
  OUT=$out/x$gpus SUITE_COMM_TESTS=0 SUITE_GEMM=0 SUITE_AB=${FULL_AB_ALL:-} \
    SUITE_XNODE=${FULL_XNODE:-none} bash scripts/comm/ep_device_suite.sh
fi
echo "== [$(el) s] done"
