#!/usr/bin/env bash
# Session 10, after the final validation: row_record written only by the layout-only dispatch
# (expand_payload off), so the default (expanding) dispatch pays nothing for it. Runs the tests
# that cover the changed receive kernels (single node and two-stage route, both settings) and
# the same-call A/B of session 9's ep_bench against this build's, defaults.
# Call: run(kind="nvidia-h100-x2", carry=["build-bundle/bins.tar.xz","build-regress/ep_bench_s9"],
#           command="bash docs/comm/runs/ep-s10-final-fix.sh")
set -uo pipefail
cd "$(dirname "$0")/../../.."
export NCCL_NVLS_ENABLE=0 CUDA_MODULE_LOADING=EAGER
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl_lib}:${LD_LIBRARY_PATH:-}
bin=build-bundle/bin
[[ -x $bin/test_comm_gpu ]] || { mkdir -p $bin && tar xJf build-bundle/bins.tar.xz -C $bin; }
O=${OUT:-/tmp/fix}; R=$(mktemp -d); mkdir -p "$O"
F='MoeLayerGpu.*:ForwardTest.NodesOfGpusNvlinkWire:ForwardTest.NodesOnOneGpu'
F+=':ForwardTest.GraphCapturedRoundReplays:ForwardTest.OverflowIsReported'
F+=':NvlinkTest.MatchesReferenceFp8AllGpus:NvlinkTest.MatchesReferenceFp8OneGpuManyRanks'
F+=':NvlinkTest.DispatchDirectRowsMatchReference:NvlinkTest.RoundsBackToBackWithoutHostSyncMatchReference'
F+=':NvlinkTest.OverflowIsReported'
timeout 200 "$bin/test_comm_gpu" --gtest_filter="$F" > "$R/tests.log" 2>&1
echo "test_comm_gpu rc=$?"
grep -E "^\[  (PASSED|FAILED)  \]|^\[  FAILED  \] [A-Za-z]|Failure" "$R/tests.log" | head -20
OUT=$R/ab BUILDS="s9=build-regress/ep_bench_s9 now=$bin/ep_bench" AB=default PROCS=2 GPUS=0,1 ROUNDS=${ROUNDS:-2} \
  bash scripts/comm/ep_ab_builds.sh 2>&1 | grep -E "rc=|normal +(dispatch|combine) "
tar czf "$O/fix.tgz" -C "$R" .
