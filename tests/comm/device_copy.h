// Host <-> device copies for the comm GPU tests, each on a given device (ranks live on several
// GPUs of one process). Buffers are at least one element so that a rank with T = 0 still has a
// valid pointer to pass.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "fp8moe/core/cuda_check.h"

namespace fp8moe::comm::testing {

inline int gpu_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

template <typename T>
T* to_device(int device, const std::vector<T>& v) {
  FM_CHECK_CUDA(cudaSetDevice(device));
  T* p = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty())
    FM_CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

template <typename T>
std::vector<T> to_host(int device, const T* p, size_t n) {
  FM_CHECK_CUDA(cudaSetDevice(device));
  std::vector<T> v(n);
  if (n > 0) FM_CHECK_CUDA(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

}  // namespace fp8moe::comm::testing
