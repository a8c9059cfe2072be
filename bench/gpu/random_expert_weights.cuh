// Random expert weights for the multi-GPU MoE benchmarks (moe_layer_bench, eplb_moe_bench):
// E4M3 codes written on the device with constant scales (values do not matter to the times),
// with the transposed forms the backward reads, and random BF16 activations. Included by one
// translation unit per program (bench/gpu/*.cu).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/moe/expert_ffn_gpu.h"

namespace fp8moe::bench {

constexpr int kFillBlocks = 2048;

__global__ void fill_e4m3_kernel(uint8_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    // Finite E4M3 codes only (0x7F / 0xFF are NaN).
    uint8_t c = static_cast<uint8_t>(philox_u32(seed, 0, static_cast<uint64_t>(i)));
    if ((c & 0x7F) == 0x7F) c ^= 1;
    p[i] = c;
  }
}
__global__ void fill_f32_kernel(float* p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}
__global__ void fill_bf16_kernel(uint16_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float v = 2.0f * philox_uniform(seed, 1, static_cast<uint64_t>(i)) - 1.0f;
    p[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);
  }
}

// Uniform random routing of `tokens` tokens: top_k distinct experts of `experts` each, gate
// weights in [0.05, 0.3], from Philox stream (seed, stream); [tokens * top_k] each.
inline void random_topk(int64_t tokens, int top_k, int experts, uint64_t seed, uint64_t stream,
                        std::vector<int32_t>& idx, std::vector<float>& w) {
  idx.assign(static_cast<size_t>(tokens * top_k), 0);
  w.assign(static_cast<size_t>(tokens * top_k), 0.0f);
  PhiloxStream rng(seed, stream);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j) {
      int32_t e;
      bool dup;
      do {
        e = static_cast<int32_t>(rng.next_u32() % experts);
        dup = false;
        for (int q = 0; q < j; ++q) dup |= idx[t * top_k + q] == e;
      } while (dup);
      idx[t * top_k + j] = e;
      w[t * top_k + j] = 0.05f + 0.25f * rng.uniform();
    }
}

template <typename T>
T* device_alloc(int64_t n) {
  void* p = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)));
  return static_cast<T*>(p);
}

// One rank's device weights (random codes, constant scales, with transposes) as views.
struct DeviceWeights {
  std::vector<void*> owned;
  ExpertWeightsGpu view;
  DeviceWeights(int64_t G, int64_t H, int64_t I, uint64_t seed, cudaStream_t s) {
    const int64_t I2 = 2 * I;
    auto codes = [&](int64_t n) {
      uint8_t* p = device_alloc<uint8_t>(n);
      owned.push_back(p);
      fill_e4m3_kernel<<<kFillBlocks, 256, 0, s>>>(p, n, ++seed);
      FM_CHECK_LAUNCH();
      return p;
    };
    auto scales = [&](int64_t n) {
      float* p = device_alloc<float>(n);
      owned.push_back(p);
      fill_f32_kernel<<<kFillBlocks, 256, 0, s>>>(p, n, 1.0f / 1024);
      FM_CHECK_LAUNCH();
      return p;
    };
    view.groups = G;
    view.hidden = H;
    view.inter = I;
    view.w13 = codes(G * I2 * H);
    view.s13 = scales(G * (I2 / 128) * (H / 128));
    view.w2 = codes(G * H * I);
    view.s2 = scales(G * (H / 128) * (I / 128));
    view.w13t = codes(G * H * I2);
    view.s13t = scales(G * (H / 128) * (I2 / 128));
    view.w2t = codes(G * I * H);
    view.s2t = scales(G * (I / 128) * (H / 128));
  }
  ~DeviceWeights() {
    for (void* p : owned) cudaFree(p);
  }
};

}  // namespace fp8moe::bench
