// Dequantise, transpose, requantise 1x128 E4M3 (kernels/requantize.h): one CTA of 128 threads per
// 128 x 128 tile. The tile's codes (16 KiB) and its 128 row scales go to shared memory with
// coalesced 16-byte loads; thread c then owns output row c of the tile (column c of the input):
// amax over the 128 dequantised values, the scale, and 128 codes stored as eight 16-byte vectors.
// Checked bit for bit against requantize_1x128_transpose_reference (requantize_reference.cpp):
// `test_kernels_gpu --gtest_filter='Requant*'`.
#include <cuda_runtime.h>

#include <cfloat>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/requantize.h"

namespace fp8moe::kernels {
namespace {

constexpr int kTile = 128;
constexpr int kSmemLd = kTile + 16;  // bytes per shared row: 16-byte aligned, banks staggered

__host__ __device__ __forceinline__ int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}

// The CPU's fp8_scale_for_amax, operation for operation (as sm90_fp8_quantize.cu).
__device__ __forceinline__ float scale_for_amax(float amax, bool pow2) {
  float scale = amax > 0.0f ? fmaxf(__fdiv_rn(amax, kE4M3Max), FLT_MIN) : 1.0f;
  if (pow2) scale = round_up_pow2(scale);
  return scale;
}

// grid (cols / 128, rows / 128), 128 threads.
__global__ void __launch_bounds__(kTile)
    requantize_transpose_kernel(const uint8_t* codes, int64_t ld, const float* scales,
                                bool mn_major, int64_t rows, int64_t cols,
                                const int32_t* grouped_layout, bool pow2, uint8_t* codes_t,
                                float* scales_t) {
  __shared__ __align__(16) uint8_t tile[kTile * kSmemLd];
  __shared__ float row_scale[kTile];  // 0 for padding rows (their codes are zeroed too)
  const int t = threadIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t cb = blockIdx.x;

  {
    const int64_t r = r0 + t;
    const bool real = grouped_layout == nullptr || __ldg(grouped_layout + r) >= 0;
    row_scale[t] =
        real ? __ldg(mn_major ? scales + cb * pad4(rows) + r : scales + r * (cols / kTile) + cb)
             : 0.0f;
  }
  __syncthreads();
  // 128 rows x 8 vectors of 16 bytes: vector i -> row i / 8, part i % 8.
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int i = k * kTile + t;
    const int rr = i / 8, part = i % 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row_scale[rr] != 0.0f || grouped_layout == nullptr)
      v = __ldg(reinterpret_cast<const uint4*>(codes + (r0 + rr) * ld + c0 + part * 16));
    *reinterpret_cast<uint4*>(tile + rr * kSmemLd + part * 16) = v;
  }
  __syncthreads();

  // Padding rows: value 0 whatever their codes (a NaN code times 0 would be NaN).
  auto value = [&](int rr) -> float {
    const float s = row_scale[rr];
    return s == 0.0f ? 0.0f : __fmul_rn(e4m3_bits_to_float(tile[rr * kSmemLd + t]), s);
  };
  float amax = 0.0f;
  for (int rr = 0; rr < kTile; ++rr) amax = fmaxf(amax, fabsf(value(rr)));
  const float scale = scale_for_amax(amax, pow2);
  uint8_t* out = codes_t + (c0 + t) * rows + r0;
#pragma unroll 1
  for (int v = 0; v < kTile / 16; ++v) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t word = 0;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float q = __fdiv_rn(value(v * 16 + j * 4 + b), scale);
        word |= static_cast<uint32_t>(float_to_e4m3_bits(q)) << (8 * b);
      }
      w[j] = word;
    }
    reinterpret_cast<uint4*>(out)[v] = make_uint4(w[0], w[1], w[2], w[3]);
  }
  // M-major over [cols, rows]: [rows / 128][pad(cols)].
  const int64_t ldt = pad4(cols);
  scales_t[static_cast<int64_t>(blockIdx.y) * ldt + c0 + t] = scale;
  if (blockIdx.x == 0 && t < ldt - cols)
    scales_t[static_cast<int64_t>(blockIdx.y) * ldt + cols + t] = 0.0f;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

void requantize_1x128_transpose(const uint8_t* codes, int64_t ld, const float* scales,
                                ScaleLayout layout, int64_t rows, int64_t cols,
                                const int32_t* grouped_layout, bool pow2_scales, uint8_t* codes_t,
                                float* scales_t, cudaStream_t stream) {
  constexpr const char* kName = "requantize_1x128_transpose";
  FM_CHECK_ARG(rows >= 0 && rows % kTile == 0, kName, ": rows=", rows,
               " is not a multiple of 128 (one expert per 128-row tile)");
  FM_CHECK_ARG(cols > 0 && cols % kTile == 0, kName, ": cols=", cols,
               " is not a positive multiple of 128");
  FM_CHECK_ARG(ld >= cols && ld % 16 == 0, kName, ": ld=", ld, " (>= cols=", cols,
               ", a multiple of 16)");
  FM_CHECK_ARG(
      rows / kTile < 65536 && cols / kTile < (int64_t{1} << 31) && rows * cols < (int64_t{1} << 40),
      kName, ": [", rows, ", ", cols, "] too large");
  if (rows == 0) return;
  FM_CHECK_ARG(codes != nullptr && scales != nullptr && codes_t != nullptr && scales_t != nullptr,
               kName, ": null codes, scales, codes_t or scales_t");
  FM_CHECK_ARG(aligned16(codes) && aligned16(codes_t), kName,
               ": codes and codes_t must be 16-byte aligned");
  const dim3 grid(static_cast<unsigned>(cols / kTile), static_cast<unsigned>(rows / kTile));
  requantize_transpose_kernel<<<grid, kTile, 0, stream>>>(
      codes, ld, scales, layout == ScaleLayout::kMnMajor, rows, cols, grouped_layout, pow2_scales,
      codes_t, scales_t);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
