// The naive SwiGLU forms the GPU benches time as their anchors (swiglu_bench, expert_ffn_bench):
// a plain BF16 SwiGLU kernel (then kernels::quantize_1x128 in the benches), a plain elementwise
// backward and a per-row d_row_scale pass. Included by one translation unit per bench binary.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fp8moe/core/dtypes.h"

// NOTE: a named namespace only: nvcc's host stubs cannot tell an anonymous namespace nested here
// from the includer's own anonymous namespace ("reference ... is ambiguous").
namespace fp8moe::bench {

__device__ __forceinline__ void unpack8(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&p);
}
__device__ __forceinline__ float sigmoid(float g) {
  return 1.0f / (1.0f + expf(-g));
}

// h[r, j] = bf16(silu(g) * u * w): one thread per 8 columns.
__global__ void naive_swiglu_kernel(const bf16* gu, int64_t rows, int64_t inter, const float* w,
                                    bf16* h) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= rows * inter) return;
  const int64_t r = i / inter, c = i % inter;
  float g[8], u[8], o[8];
  unpack8(*reinterpret_cast<const uint4*>(gu + r * 2 * inter + c), g);
  unpack8(*reinterpret_cast<const uint4*>(gu + r * 2 * inter + inter + c), u);
  const float wr = w != nullptr ? w[r] : 1.0f;
  for (int k = 0; k < 8; ++k) o[k] = g[k] * sigmoid(g[k]) * u[k] * wr;
  *reinterpret_cast<uint4*>(h + i) =
      make_uint4(pack2(o[0], o[1]), pack2(o[2], o[3]), pack2(o[4], o[5]), pack2(o[6], o[7]));
}

__global__ void naive_backward_kernel(const bf16* gu, const bf16* dh, int64_t rows, int64_t inter,
                                      const float* w, bf16* d) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (i >= rows * inter) return;
  const int64_t r = i / inter, c = i % inter;
  float g[8], u[8], a[8], dg[8], du[8];
  unpack8(*reinterpret_cast<const uint4*>(gu + r * 2 * inter + c), g);
  unpack8(*reinterpret_cast<const uint4*>(gu + r * 2 * inter + inter + c), u);
  unpack8(*reinterpret_cast<const uint4*>(dh + i), a);
  const float wr = w != nullptr ? w[r] : 1.0f;
  for (int k = 0; k < 8; ++k) {
    const float s = sigmoid(g[k]), da = a[k] * wr;
    du[k] = da * g[k] * s;
    dg[k] = da * u[k] * s * (1.0f + g[k] * (1.0f - s));
  }
  *reinterpret_cast<uint4*>(d + r * 2 * inter + c) = make_uint4(
      pack2(dg[0], dg[1]), pack2(dg[2], dg[3]), pack2(dg[4], dg[5]), pack2(dg[6], dg[7]));
  *reinterpret_cast<uint4*>(d + r * 2 * inter + inter + c) = make_uint4(
      pack2(du[0], du[1]), pack2(du[2], du[3]), pack2(du[4], du[5]), pack2(du[6], du[7]));
}

// d_row_scale[r] = sum_j dh * silu(g) * u: a block of 256 per row.
__global__ void naive_row_sum_kernel(const bf16* gu, const bf16* dh, int64_t inter, float* out) {
  __shared__ float part[8];
  const int64_t r = blockIdx.x;
  float sum = 0.0f;
  for (int64_t c = threadIdx.x * 8; c < inter; c += 256 * 8) {
    float g[8], u[8], a[8];
    unpack8(*reinterpret_cast<const uint4*>(gu + r * 2 * inter + c), g);
    unpack8(*reinterpret_cast<const uint4*>(gu + r * 2 * inter + inter + c), u);
    unpack8(*reinterpret_cast<const uint4*>(dh + r * inter + c), a);
    for (int k = 0; k < 8; ++k) sum += a[k] * g[k] * sigmoid(g[k]) * u[k];
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int k = 0; k < 8; ++k) s += part[k];
    out[r] = s;
  }
}

}  // namespace fp8moe::bench
