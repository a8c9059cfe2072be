// Dequantise, transpose, requantise 1x128 E4M3 (kernels/requantize.h): one CTA of 256 threads per
// 128 x 128 tile. The tile's codes (16 KiB) go to shared memory with coalesced 16-byte loads (rows
// whose scale is 0, padding rows included, are not read: zero codes), 16-byte parts swizzled by
// the row's 16-row group so that the reads below are free of bank conflicts. Thread (w, g) (w one
// of the 32 four-column words, g one of 8 groups of 16 rows; the 8 g of a w are 8 adjacent lanes)
// then reads its 16 words, decodes them with the hardware conversion (e4m3x2 -> f16x2, exact),
// multiplies by the row scales, takes the amax of each of its 4 columns over its 16 rows, shuffles
// it over the 8 lanes, and stores 16 codes per column (cvt.rn.satfinite.e4m3x2.f32) as one 16-byte
// vector: 8 lanes write one 128-byte output row segment.
// Checked bit for bit against requantize_1x128_transpose_reference (requantize_reference.cpp):
// `test_kernels_gpu --gtest_filter='Requant*'`.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/exact_quotient.h"
#include "fp8moe/kernels/requantize.h"

namespace fp8moe::kernels {
namespace {

constexpr int kTile = 128;
constexpr int kThreads = 256;
constexpr int kRowsPerLane = 16;  // 8 lanes x 16 rows = the tile's 128 rows

__host__ __device__ __forceinline__ int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}

// The CPU's fp8_scale_for_amax, operation for operation (as sm90_fp8_quantize.cu).
__device__ __forceinline__ float scale_for_amax(float amax, bool pow2) {
  // NOTE: amax / 448 formed without a division, bit for bit (exact_quotient.h).
  float scale = amax > 0.0f ? fmaxf(exact_quotient_any(amax, e4m3_max_divisor()), FLT_MIN) : 1.0f;
  if (pow2) scale = round_up_pow2(scale);
  return scale;
}

// Two E4M3 codes (lo in the low byte) -> two floats, exact (every E4M3 value is an FP16 value).
__device__ __forceinline__ float2 decode_e4m3x2(uint32_t pair) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}
// Two E4M3 codes (lo in the low byte): cvt.rn.satfinite.e4m3x2.f32, equal to the CPU's
// float_to_e4m3_bits for every finite float (SwigluGpu.HardwareE4m3MatchesCodec checks them all;
// the CPU reference throws on non-finite values, so only finite quotients matter).
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

// Byte offset of row rr's 16-byte part p in the swizzled tile (rows of 128 bytes; part p of row
// rr sits at p ^ (rr / 16 % 8)).
__device__ __forceinline__ int swz(int rr, int p) {
  return rr * kTile + ((p ^ (rr / kRowsPerLane)) * 16);
}

// grid (cols / 128, rows / 128), 256 threads.
// NOTE: 3 CTAs/SM as before s20-dv: the division-free quotients (exact_quotient.h) are scheduled
// in parallel and took 100 registers (2 CTAs/SM) unbounded.
__global__ void __launch_bounds__(kThreads, 3)
    requantize_transpose_kernel(const uint8_t* codes, int64_t ld, const float* scales,
                                bool mn_major, int64_t rows, int64_t cols,
                                const int32_t* grouped_layout, bool pow2, uint8_t* codes_t,
                                float* scales_t) {
  __shared__ __align__(16) uint8_t tile[kTile * kTile];
  // +0 for padding rows and zero scales (their codes are zeroed too, so every value there is
  // +0 * +0 = +0, the reference's "s == 0 ? 0 : code * s").
  __shared__ __align__(16) float row_scale[kTile];
  const int t = threadIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t cb = blockIdx.x;

  if (t < kTile) {
    const int64_t r = r0 + t;
    const bool real = grouped_layout == nullptr || __ldg(grouped_layout + r) >= 0;
    const float s =
        real ? __ldg(mn_major ? scales + cb * pad4(rows) + r : scales + r * (cols / kTile) + cb)
             : 0.0f;
    row_scale[t] = s == 0.0f ? 0.0f : s;  // -0 becomes +0
  }
  __syncthreads();
  // 128 rows x 8 parts of 16 bytes: vector i -> row i / 8, part i % 8 (8 lanes per 128 bytes).
  {
    uint4 v[kTile * 8 / kThreads];
#pragma unroll
    for (int k = 0; k < kTile * 8 / kThreads; ++k) {
      const int i = k * kThreads + t;
      const int rr = i / 8, part = i % 8;
      v[k] = make_uint4(0, 0, 0, 0);
      if (row_scale[rr] != 0.0f)
        v[k] = __ldg(reinterpret_cast<const uint4*>(codes + (r0 + rr) * ld + c0 + part * 16));
    }
#pragma unroll
    for (int k = 0; k < kTile * 8 / kThreads; ++k) {
      const int i = k * kThreads + t;
      *reinterpret_cast<uint4*>(tile + swz(i / 8, i % 8)) = v[k];
    }
  }
  __syncthreads();

  // Thread t: lane group g = t % 8 (rows 16 g .. 16 g + 15), word w = t / 8 (columns 4 w .. 4 w +
  // 3).
  const int g = t % 8, w = t / 8;
  uint32_t word[kRowsPerLane];
  float s[kRowsPerLane];
#pragma unroll
  for (int i = 0; i < kRowsPerLane; ++i) {
    const int rr = g * kRowsPerLane + i;
    word[i] = *reinterpret_cast<const uint32_t*>(tile + swz(rr, w / 4) + (w % 4) * 4);
  }
#pragma unroll
  for (int i = 0; i < kRowsPerLane; i += 4) {
    const float4 q = *reinterpret_cast<const float4*>(row_scale + g * kRowsPerLane + i);
    s[i] = q.x;
    s[i + 1] = q.y;
    s[i + 2] = q.z;
    s[i + 3] = q.w;
  }
  const int64_t ldt = pad4(cols);
  // Two columns at a time: half 0 holds columns 4 w and 4 w + 1, half 1 columns 4 w + 2, 4 w + 3.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float a[kRowsPerLane], b[kRowsPerLane];
    float amax_a = 0.0f, amax_b = 0.0f;
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
      const float2 d = decode_e4m3x2(word[i] >> (16 * half));
      a[i] = __fmul_rn(d.x, s[i]);
      b[i] = __fmul_rn(d.y, s[i]);
      amax_a = fmaxf(amax_a, fabsf(a[i]));
      amax_b = fmaxf(amax_b, fabsf(b[i]));
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) {
      amax_a = fmaxf(amax_a, __shfl_xor_sync(0xFFFFFFFFu, amax_a, o));
      amax_b = fmaxf(amax_b, __shfl_xor_sync(0xFFFFFFFFu, amax_b, o));
    }
    // Codes e4m3(v / scale): the IEEE quotient without a division (exact_quotient.h); a
    // power-of-two scale divides exactly by multiplying with its reciprocal.
    const float scale_a = scale_for_amax(amax_a, pow2), scale_b = scale_for_amax(amax_b, pow2);
    const Divisor da = make_divisor(scale_a), db = make_divisor(scale_b);
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
      a[i] = pow2 ? __fmul_rn(a[i], da.p) : exact_quotient_any(a[i], da);
      b[i] = pow2 ? __fmul_rn(b[i], db.p) : exact_quotient_any(b[i], db);
    }
    uint32_t oa[4], ob[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      oa[j] = e4m3x2(a[4 * j], a[4 * j + 1]) | (e4m3x2(a[4 * j + 2], a[4 * j + 3]) << 16);
      ob[j] = e4m3x2(b[4 * j], b[4 * j + 1]) | (e4m3x2(b[4 * j + 2], b[4 * j + 3]) << 16);
    }
    const int64_t col = c0 + 4 * w + 2 * half;  // output rows col and col + 1
    uint8_t* out = codes_t + col * rows + r0 + g * kRowsPerLane;
    *reinterpret_cast<uint4*>(out) = make_uint4(oa[0], oa[1], oa[2], oa[3]);
    *reinterpret_cast<uint4*>(out + rows) = make_uint4(ob[0], ob[1], ob[2], ob[3]);
    // M-major over [cols, rows]: [rows / 128][pad(cols)].
    if (g == 0) {
      scales_t[static_cast<int64_t>(blockIdx.y) * ldt + col] = scale_a;
      scales_t[static_cast<int64_t>(blockIdx.y) * ldt + col + 1] = scale_b;
    }
  }
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
  requantize_transpose_kernel<<<grid, kThreads, 0, stream>>>(
      codes, ld, scales, layout == ScaleLayout::kMnMajor, rows, cols, grouped_layout, pow2_scales,
      codes_t, scales_t);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
