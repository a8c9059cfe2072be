#!/usr/bin/env bash
# Builds the comm GPU test and the EP benchmark with nvcc alone into build-comm-dev/ (git-ignored),
# so that a device run can carry ready binaries instead of configuring and compiling the whole
# project there. Needs nvcc, NCCL headers/library (CUDA toolkit or NCCL_ROOT) and GoogleTest.
# The CMake build (test_comm_gpu, ep_bench targets) builds the same sources.
# On the device: LD_LIBRARY_PATH=<dir of libnccl.so.2> build-comm-dev/test_comm_gpu
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${EP_BUILD_OUT:-build-comm-dev}  # EP_BUILD_OUT: another folder (absolute or repo-relative)
mkdir -p "$out/obj"
nccl_root=${NCCL_ROOT:-/usr/local/cuda}
cuda_flags=(-std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -lineinfo
            -Xcompiler=-Wall,-Wextra,-Werror --Werror all-warnings
            -Iinclude -Itests/comm -I"$nccl_root/include" -DFP8MOE_HAVE_CUDA=1 -DFP8MOE_HAVE_NCCL=1)
cxx_flags=(-std=c++20 -O3 -Wall -Wextra -Werror -Iinclude)
pids=()
nvcc "${cuda_flags[@]}" -c src/comm/sm90_device_ep.cu -o "$out/obj/device_ep.o" & pids+=($!)
nvcc "${cuda_flags[@]}" -c tests/comm/device_ep_gpu_test.cu -o "$out/obj/device_ep_gpu_test.o" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
nvcc "${cuda_flags[@]}" -c bench/gpu/ep_bench.cu -o "$out/obj/ep_bench.o"
for f in src/comm/ep_reference.cpp src/core/error.cpp src/core/dtypes.cpp; do
  g++ "${cxx_flags[@]}" -c "$f" -o "$out/obj/$(basename "$f" .cpp).o"
done
common=("$out/obj/device_ep.o" "$out/obj/ep_reference.o" "$out/obj/error.o" "$out/obj/dtypes.o"
        -L"$nccl_root/lib" -L"$nccl_root/lib64" -lnccl -Xcompiler -static-libstdc++ -lpthread)
nvcc -gencode=arch=compute_90a,code=sm_90a -o "$out/test_comm_gpu" "$out/obj/device_ep_gpu_test.o" \
  "${common[@]}" /usr/lib/x86_64-linux-gnu/libgtest_main.a /usr/lib/x86_64-linux-gnu/libgtest.a
nvcc -gencode=arch=compute_90a,code=sm_90a -o "$out/ep_bench" "$out/obj/ep_bench.o" "${common[@]}"
ls -la "$out/test_comm_gpu" "$out/ep_bench"
