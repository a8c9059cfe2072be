#!/usr/bin/env bash
# Builds the comm GPU test and the EP benchmark here (CMake targets test_comm_gpu and ep_bench,
# libstdc++ and libgcc linked statically) and copies them into build-comm-dev/ (git-ignored), so
# that a device run can carry ready binaries instead of configuring and compiling there. Needs
# nvcc, NCCL headers/library (CUDA toolkit, or NCCL_ROOT) and GoogleTest.
# NOTE: it used to call nvcc on a fixed list of files, which missed every file added since (the
# two-stage route, the low-latency kernels, the launcher and its tests) and no longer linked; the
# CMake build globs the module's files.
# EP_BUILD_OUT: the folder for the binaries (default build-comm-dev); EP_CMAKE_DIR: the CMake
# build tree (default build-comm-cmake, not carried).
# On the device: LD_LIBRARY_PATH=<dir of libnccl.so.2> build-comm-dev/test_comm_gpu
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${EP_BUILD_OUT:-build-comm-dev}
tree=${EP_CMAKE_DIR:-build-comm-cmake}
cmake -S . -B "$tree" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFP8MOE_BUILD_BENCH=ON \
  -DCMAKE_EXE_LINKER_FLAGS="-static-libstdc++ -static-libgcc" \
  ${NCCL_ROOT:+-DFP8MOE_NCCL_ROOT="$NCCL_ROOT"} > /dev/null
cmake --build "$tree" -j "${JOBS:-2}" --target test_comm_gpu ep_bench
mkdir -p "$out"
cp "$tree/tests/test_comm_gpu" "$tree/bench/ep_bench" "$out/"
ls -la "$out/test_comm_gpu" "$out/ep_bench"
