// Fine-grained E4M3 quantisation on the GPU: 1x128 per token (a warp per 128-element tile, amax by
// shuffles), 128x128 blocks (a CTA per block), and the fused 1x128 cast + transpose (a CTA per
// 128x128 tile staged in shared memory, rows then columns). Bit-exact against the CPU
// fp8moe::quantize: `build-device/tests/test_kernels_gpu --gtest_filter='Quantize*'`.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <string>
#include <type_traits>
#include <utility>

#include "bf16_vector.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/exact_quotient.h"
#include "fp8moe/kernels/quantize.h"

namespace fp8moe::kernels {
namespace {

__device__ __forceinline__ float load_value(const float* p) {
  return __ldg(p);
}
__device__ __forceinline__ float load_value(const bf16* p) {
  return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// The CPU's fp8_scale_for_amax, operation for operation.
__device__ __forceinline__ float scale_for_amax(float amax, bool pow2) {
  // NOTE: amax / 448 formed without a division, bit for bit (exact_quotient.h).
  float scale = amax > 0.0f ? fmaxf(exact_quotient_any(amax, e4m3_max_divisor()), FLT_MIN) : 1.0f;
  if (pow2) scale = round_up_pow2(scale);
  return scale;
}
// NOTE: e4m3(x / scale) with the IEEE quotient formed without a division (exact_quotient.h),
// also for +-inf, NaN and an infinite scale.
__device__ __forceinline__ uint8_t encode(float x, const Divisor& d) {
  return float_to_e4m3_bits(exact_quotient_any(x, d));
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
// Rare path, so plain atomics: finite inputs pay one compare per value.
__device__ __noinline__ void note_nonfinite(NonFiniteReport* report, float v, int64_t row,
                                            int64_t col) {
  atomicAdd(&report->count, 1ull);
  atomicMin(&report->first_key,
            (static_cast<unsigned long long>(row) << 24) | static_cast<unsigned long long>(col));
  atomicOr(&report->kinds, isnan(v) ? 1u : (v > 0.0f ? 2u : 4u));
}
__device__ __forceinline__ void check_value(NonFiniteReport* report, float v, int64_t row,
                                            int64_t col) {
  if (report != nullptr && !isfinite(v)) [[unlikely]]
    note_nonfinite(report, v, row, col);
}

__host__ __device__ __forceinline__ int64_t pad4(int64_t x) {
  return (x + 3) / 4 * 4;
}
__host__ __device__ __forceinline__ int64_t scale_index(ScaleLayout layout, int64_t row,
                                                        int64_t tile, int64_t rows, int64_t tiles) {
  return layout == ScaleLayout::kRowMajor ? row * tiles + tile : tile * pad4(rows) + row;
}

// ---- 1x128: one warp per (row, 128-column tile); lanes own columns lane + 32j ----
template <typename T>
__global__ void quantize_1x128_kernel(const T* x, int64_t rows, int64_t cols, int64_t ld, bool pow2,
                                      uint8_t* codes, int64_t ld_codes, float* scales,
                                      ScaleLayout layout, int64_t rows_launched,
                                      NonFiniteReport* nonfinite) {
  const int64_t tiles = (cols + 127) / 128;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp_id >= rows_launched * tiles) return;
  const int64_t row = warp_id / tiles, tile = warp_id % tiles;
  if (row >= rows) {  // M-major padding rows
    if (lane == 0) scales[scale_index(layout, row, tile, rows, tiles)] = 0.0f;
    return;
  }
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = tile * 128 + lane + 32 * j;
    v[j] = c < cols ? load_value(x + row * ld + c) : 0.0f;
    check_value(nonfinite, v[j], row, c);
    amax = fmaxf(amax, fabsf(v[j]));
  }
  amax = warp_max(amax);
  const float scale = scale_for_amax(amax, pow2);
  const Divisor d = make_divisor(scale);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = tile * 128 + lane + 32 * j;
    if (c < cols) codes[row * ld_codes + c] = encode(v[j], d);
  }
  if (lane == 0) scales[scale_index(layout, row, tile, rows, tiles)] = scale;
}

// The largest of a 256-thread block's values (every thread gets it): warps, then shared memory.
__device__ __forceinline__ float block256_max(float v, float* warp_max_smem) {
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) warp_max_smem[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_max_smem[0];
#pragma unroll
  for (int w = 1; w < 8; ++w) v = fmaxf(v, warp_max_smem[w]);
  return v;
}

// ---- 128x128: one CTA of 256 threads per block ----
template <typename T>
__global__ void __launch_bounds__(256, 1)
    quantize_128x128_kernel(const T* x, int64_t rows, int64_t cols, int64_t ld, bool pow2,
                            uint8_t* codes, int64_t ld_codes, float* scales,
                            NonFiniteReport* nonfinite) {
  __shared__ float warp_amax[8];
  const int64_t tiles_c = (cols + 127) / 128;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 128,
                c0 = static_cast<int64_t>(blockIdx.x) * 128;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float v[16][4];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t r = r0 + warp + 8 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + lane + 32 * j;
      v[i][j] = (r < rows && c < cols) ? load_value(x + r * ld + c) : 0.0f;
      check_value(nonfinite, v[i][j], r, c);
      amax = fmaxf(amax, fabsf(v[i][j]));
    }
  }
  amax = block256_max(amax, warp_amax);
  const float scale = scale_for_amax(amax, pow2);
  const Divisor d = make_divisor(scale);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t r = r0 + warp + 8 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + lane + 32 * j;
      if (r < rows && c < cols) codes[r * ld_codes + c] = encode(v[i][j], d);
    }
  }
  if (threadIdx.x == 0) scales[blockIdx.y * tiles_c + blockIdx.x] = scale;
}

// ---- fused 1x128 cast + transpose: one CTA per 128x128 tile of x ----
constexpr int kTStride = 129;  // one float of padding: column reads hit 32 different banks
constexpr size_t kTransposeSmem = 128 * kTStride * sizeof(float);

template <typename T>
__global__ void __launch_bounds__(256)
    quantize_transpose_kernel(const T* x, int64_t rows, int64_t cols, int64_t ld, bool pow2,
                              uint8_t* codes, float* scales, uint8_t* codes_t, float* scales_t,
                              ScaleLayout layout, NonFiniteReport* nonfinite) {
  extern __shared__ float tile[];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 128,
                c0 = static_cast<int64_t>(blockIdx.x) * 128;
  const int64_t tiles_c = (cols + 127) / 128, tiles_r = (rows + 127) / 128;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < 128 * 128; i += 256) {
    const int r = i / 128, c = i % 128;
    const float v =
        (r0 + r < rows && c0 + c < cols) ? load_value(x + (r0 + r) * ld + c0 + c) : 0.0f;
    check_value(nonfinite, v, r0 + r, c0 + c);
    tile[r * kTStride + c] = v;
  }
  __syncthreads();
  // Rows of x: 1x128 along cols. Warp w takes rows 16w..16w+15.
  if (codes != nullptr) {
    for (int rr = 0; rr < 16; ++rr) {
      const int r = warp * 16 + rr;
      if (r0 + r >= rows) break;
      float amax = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(tile[r * kTStride + lane + 32 * j]));
      const float scale = scale_for_amax(warp_max(amax), pow2);
      const Divisor d = make_divisor(scale);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + lane + 32 * j;
        if (c < cols) codes[(r0 + r) * cols + c] = encode(tile[r * kTStride + lane + 32 * j], d);
      }
      if (lane == 0) scales[scale_index(layout, r0 + r, blockIdx.x, rows, tiles_c)] = scale;
    }
  }
  // Columns of x = rows of x^T: 1x128 along rows. Warp w takes columns 16w..16w+15.
  for (int cc = 0; cc < 16; ++cc) {
    const int c = warp * 16 + cc;
    if (c0 + c >= cols) break;
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(tile[(lane + 32 * j) * kTStride + c]));
    const float scale = scale_for_amax(warp_max(amax), pow2);
    const Divisor d = make_divisor(scale);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + lane + 32 * j;
      if (r < rows) codes_t[(c0 + c) * rows + r] = encode(tile[(lane + 32 * j) * kTStride + c], d);
    }
    if (lane == 0) scales_t[scale_index(layout, c0 + c, blockIdx.y, cols, tiles_r)] = scale;
  }
  // M-major padding entries of both scale arrays are zero (their rows do not exist).
  if (layout == ScaleLayout::kMnMajor && threadIdx.x < 4) {
    const int64_t pr = rows + threadIdx.x;
    if (codes != nullptr && blockIdx.y == tiles_r - 1 && pr < pad4(rows))
      scales[scale_index(layout, pr, blockIdx.x, rows, tiles_c)] = 0.0f;
    const int64_t pc = cols + threadIdx.x;
    if (blockIdx.x == tiles_c - 1 && pc < pad4(cols))
      scales_t[scale_index(layout, pc, blockIdx.y, cols, tiles_r)] = 0.0f;
  }
}

// ---- fused 1x128 cast + transpose, BF16 fast path: one CTA of 256 threads per 128x128 tile ----
// Taken when every 16-byte access is aligned (kernel_fast_ok below): cols and ld multiples of 8,
// rows a multiple of 16, x 16-byte, codes 8-byte, codes_t 16-byte aligned. The tile's BF16 values
// (32 KiB) are read once from global with 16-byte loads (8 lanes per row: lane l takes columns
// 8l..8l+7 and 64+8l..64+8l+7, so each load instruction reads whole 128-byte rows); the row-major
// codes come straight from registers (8-lane shuffle amax, two 8-byte stores); the values go to
// shared memory as BF16 pairs, 16-byte parts swizzled by the row's 16-row group, so that the
// column pass (thread (g, p): rows 16g..16g+15 of columns 2p, 2p+1; 8 lanes per column pair) reads
// one 4-byte word per row free of bank conflicts and writes 16 transposed codes as one 16-byte
// vector (8 lanes: one 128-byte output row segment). Codes: the IEEE quotient by the scale without
// a division (exact_quotient; an exact reciprocal multiply for power-of-two scales) and
// cvt.rn.satfinite.e4m3x2.f32, equal to the CPU
// codec for every finite float; a thread holding a non-finite value encodes with
// float_to_e4m3_bits as the generic kernel does.
constexpr int kQtThreads = 256;
constexpr int kQtWords = 64;  // BF16 pairs per tile row

__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ bool is_bad(float v) {
  return !(fabsf(v) <= FLT_MAX);  // NaN or +-inf
}
// 8 codes of v[0..7] (v[0] in the low byte), as the generic kernel's encode() gives them.
__device__ __forceinline__ uint2 encode8(const float* v, float scale, const Divisor& d, bool pow2,
                                         bool bad) {
  uint32_t w[2];
  if (bad || is_bad(scale)) [[unlikely]] {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      w[j] = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) w[j] |= static_cast<uint32_t>(encode(v[4 * j + i], d)) << (8 * i);
    }
  } else {
    float q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = pow2 ? __fmul_rn(v[i], d.p) : exact_quotient(v[i], d);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      w[j] = e4m3x2(q[4 * j], q[4 * j + 1]) | (e4m3x2(q[4 * j + 2], q[4 * j + 3]) << 16);
  }
  return make_uint2(w[0], w[1]);
}
// ---- 1x128, BF16 fast path: 16 lanes per 128-column tile, 16-byte loads, 8-byte code stores ----
// Taken when cols, ld and ld_codes are multiples of 8, x 16-byte and codes 8-byte aligned. A warp
// covers two tiles of one row (lanes 0-15 and 16-31); lane l of a half loads columns 8l..8l+7 of
// its tile in one 16-byte access (the generic kernel loads 2 bytes a lane: few bytes in flight,
// ~0.8 TB/s at 32768 x 7168 on H200), the amax is a 4-step shuffle within the half, the codes
// come from encode8 (the transpose's fast path: bit for bit the generic encode).
__global__ void __launch_bounds__(256)
    quantize_1x128_bf16_kernel(const bf16* x, int64_t rows, int64_t cols, int64_t ld, bool pow2,
                               uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                               int64_t rows_launched, NonFiniteReport* nonfinite) {
  const int64_t tiles = (cols + 127) / 128, pairs = (tiles + 1) / 2;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32, l = lane % 16;
  if (warp_id >= rows_launched * pairs) return;
  const int64_t row = warp_id / pairs, tile = (warp_id % pairs) * 2 + lane / 16;
  const int64_t c = tile * 128 + 8 * l;
  if (row >= rows) {  // M-major padding rows (the whole warp: row is per warp)
    if (l == 0 && tile < tiles) scales[scale_index(layout, row, tile, rows, tiles)] = 0.0f;
    return;
  }
  uint4 raw = make_uint4(0, 0, 0, 0);
  if (tile < tiles && c < cols) raw = __ldg(reinterpret_cast<const uint4*>(x + row * ld + c));
  float v[8];
  unpack_bf16x8(raw, v);
  float amax = 0.0f;
  bool bad = false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    amax = fmaxf(amax, fabsf(v[i]));
    bad |= is_bad(v[i]);
  }
  if (bad && nonfinite != nullptr) [[unlikely]] {
#pragma unroll
    for (int i = 0; i < 8; ++i) check_value(nonfinite, v[i], row, c + i);
  }
#pragma unroll
  for (int o = 1; o < 16; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  if (tile >= tiles) return;
  const float scale = scale_for_amax(amax, pow2);
  const Divisor d = make_divisor(scale);
  if (c < cols)
    *reinterpret_cast<uint2*>(codes + row * ld_codes + c) = encode8(v, scale, d, pow2, bad);
  if (l == 0) scales[scale_index(layout, row, tile, rows, tiles)] = scale;
}

// Word index (BF16 pair) of row rr's word w in the swizzled tile.
__device__ __forceinline__ int qt_swz(int rr, int w) {
  return rr * kQtWords + (w ^ (((rr >> 4) & 7) << 2));
}

__global__ void __launch_bounds__(kQtThreads)
    quantize_transpose_bf16_kernel(const bf16* x, int64_t rows, int64_t cols, int64_t ld, bool pow2,
                                   uint8_t* codes, float* scales, uint8_t* codes_t, float* scales_t,
                                   ScaleLayout layout, NonFiniteReport* nonfinite) {
  __shared__ __align__(16) uint32_t tile[128 * kQtWords];
  const int t = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * 128,
                c0 = static_cast<int64_t>(blockIdx.x) * 128;
  const int64_t tiles_c = (cols + 127) / 128, tiles_r = (rows + 127) / 128;

  // Rows: pass p, thread t -> row 32p + t/8, lane l = t%8 (columns 8l.. and 64+8l..).
  {
    const int l = t % 8;
    uint4 raw[4][2];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int64_t r = r0 + 32 * p + t / 8;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = c0 + 64 * h + 8 * l;
        raw[p][h] = make_uint4(0, 0, 0, 0);
        if (r < rows && c < cols) raw[p][h] = __ldg(reinterpret_cast<const uint4*>(x + r * ld + c));
      }
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int rr = 32 * p + t / 8;
      const int64_t r = r0 + rr;
      float v[16];
      float amax = 0.0f;
      bool bad = false;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t w[4] = {raw[p][h].x, raw[p][h].y, raw[p][h].z, raw[p][h].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          v[8 * h + 2 * i] = __uint_as_float(w[i] << 16);
          v[8 * h + 2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
        }
        *reinterpret_cast<uint4*>(tile + qt_swz(rr, 32 * h + 4 * l)) = raw[p][h];
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        amax = fmaxf(amax, fabsf(v[i]));
        bad |= is_bad(v[i]);
      }
      if (bad && nonfinite != nullptr) [[unlikely]] {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int64_t c = c0 + 64 * (i / 8) + 8 * l + i % 8;
          if (r < rows && c < cols) check_value(nonfinite, v[i], r, c);
        }
      }
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
      if (codes != nullptr && r < rows) {
        const float scale = scale_for_amax(amax, pow2);
        const Divisor d = make_divisor(scale);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t c = c0 + 64 * h + 8 * l;
          if (c < cols)
            *reinterpret_cast<uint2*>(codes + r * cols + c) =
                encode8(v + 8 * h, scale, d, pow2, bad);
        }
        if (l == 0) scales[scale_index(layout, r, blockIdx.x, rows, tiles_c)] = scale;
      }
    }
  }
  __syncthreads();

  // Columns: pass p, thread t -> column pair 32p + t/8 (columns 2(32p + t/8) and +1), group
  // g = t%8 (rows 16g..16g+15). A warp's 32 words sit in 32 different banks: w%4 = lane/8 and
  // the swizzle's bits 2..4 differ with g.
  const int g = t % 8;
  const int64_t r = r0 + 16 * g;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const int wp = 32 * p + t / 8;
    const int64_t c = c0 + 2 * wp;
    float a[16], b[16];
    float amax_a = 0.0f, amax_b = 0.0f;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t w = tile[qt_swz(16 * g + i, wp)];
      a[i] = __uint_as_float(w << 16);
      b[i] = __uint_as_float(w & 0xFFFF0000u);
      amax_a = fmaxf(amax_a, fabsf(a[i]));
      amax_b = fmaxf(amax_b, fabsf(b[i]));
      bad |= is_bad(a[i]) | is_bad(b[i]);
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) {
      amax_a = fmaxf(amax_a, __shfl_xor_sync(0xFFFFFFFFu, amax_a, o));
      amax_b = fmaxf(amax_b, __shfl_xor_sync(0xFFFFFFFFu, amax_b, o));
    }
    if (c >= cols) continue;  // cols % 8 == 0: both columns of the pair exist or neither
    const float scale_a = scale_for_amax(amax_a, pow2), scale_b = scale_for_amax(amax_b, pow2);
    const Divisor da = make_divisor(scale_a), db = make_divisor(scale_b);
    if (r < rows) {  // rows % 16 == 0: the group's 16 rows exist or none does
      const uint2 a0 = encode8(a, scale_a, da, pow2, bad),
                  a1 = encode8(a + 8, scale_a, da, pow2, bad);
      const uint2 b0 = encode8(b, scale_b, db, pow2, bad),
                  b1 = encode8(b + 8, scale_b, db, pow2, bad);
      *reinterpret_cast<uint4*>(codes_t + c * rows + r) = make_uint4(a0.x, a0.y, a1.x, a1.y);
      *reinterpret_cast<uint4*>(codes_t + (c + 1) * rows + r) = make_uint4(b0.x, b0.y, b1.x, b1.y);
    }
    if (g == 0) {
      scales_t[scale_index(layout, c, blockIdx.y, cols, tiles_r)] = scale_a;
      scales_t[scale_index(layout, c + 1, blockIdx.y, cols, tiles_r)] = scale_b;
    }
  }
  // M-major padding entries of both scale arrays are zero (their rows do not exist).
  if (layout == ScaleLayout::kMnMajor && t < 4) {
    const int64_t pr = rows + t;
    if (codes != nullptr && blockIdx.y == tiles_r - 1 && pr < pad4(rows))
      scales[scale_index(layout, pr, blockIdx.x, rows, tiles_c)] = 0.0f;
    const int64_t pc = cols + t;
    if (blockIdx.x == tiles_c - 1 && pc < pad4(cols))
      scales_t[scale_index(layout, pc, blockIdx.y, cols, tiles_r)] = 0.0f;
  }
}

void check_quant_args(const char* name, int64_t rows, int64_t cols, int64_t ld, const void* x,
                      const void* codes, const void* scales, const NonFiniteReport* nonfinite) {
  FM_CHECK_ARG(nonfinite == nullptr || cols < (int64_t{1} << 24), name, ": cols=", cols,
               " too large for a NonFiniteReport (< 2^24)");
  FM_CHECK_ARG(rows >= 0 && cols >= 0, name, ": negative shape [", rows, ",", cols, "]");
  FM_CHECK_ARG(ld >= cols, name, ": leading dimension ", ld, " < cols=", cols);
  FM_CHECK_ARG(rows * cols == 0 || (x != nullptr && codes != nullptr && scales != nullptr), name,
               ": null pointer");
  FM_CHECK_ARG(rows < (int64_t{1} << 31) / 1 && (rows + 127) / 128 < 65536, name,
               ": too many rows (", rows, ")");
}

template <typename T>
void run_1x128(const T* x, int64_t rows, int64_t cols, int64_t ld, bool pow2, uint8_t* codes,
               int64_t ld_codes, float* scales, ScaleLayout layout, cudaStream_t stream,
               NonFiniteReport* nonfinite) {
  check_quant_args("quantize_1x128", rows, cols, ld, x, codes, scales, nonfinite);
  FM_CHECK_ARG(ld_codes >= cols, "quantize_1x128: ld_codes ", ld_codes, " < cols=", cols);
  if (rows == 0 || cols == 0) return;
  const int64_t rows_launched = layout == ScaleLayout::kMnMajor ? pad4(rows) : rows;
  if constexpr (std::is_same_v<T, bf16>) {
    const auto aligned = [](const void* p, uintptr_t n) {
      return reinterpret_cast<uintptr_t>(p) % n == 0;
    };
    if (cols % 8 == 0 && ld % 8 == 0 && ld_codes % 8 == 0 && aligned(x, 16) && aligned(codes, 8)) {
      const int64_t warps = rows_launched * (((cols + 127) / 128 + 1) / 2);
      const int64_t blocks = (warps + 7) / 8;
      FM_CHECK_ARG(blocks < (int64_t{1} << 31), "quantize_1x128: matrix too large");
      quantize_1x128_bf16_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          x, rows, cols, ld, pow2, codes, ld_codes, scales, layout, rows_launched, nonfinite);
      FM_CHECK_LAUNCH();
      return;
    }
  }
  const int64_t warps = rows_launched * ((cols + 127) / 128);
  const int64_t blocks = (warps + 7) / 8;
  FM_CHECK_ARG(blocks < (int64_t{1} << 31), "quantize_1x128: matrix too large");
  quantize_1x128_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      x, rows, cols, ld, pow2, codes, ld_codes, scales, layout, rows_launched, nonfinite);
  FM_CHECK_LAUNCH();
}

template <typename T>
void run_128x128(const T* x, int64_t rows, int64_t cols, int64_t ld, bool pow2, uint8_t* codes,
                 int64_t ld_codes, float* scales, cudaStream_t stream, NonFiniteReport* nonfinite) {
  check_quant_args("quantize_128x128", rows, cols, ld, x, codes, scales, nonfinite);
  FM_CHECK_ARG(ld_codes >= cols, "quantize_128x128: ld_codes ", ld_codes, " < cols=", cols);
  if (rows == 0 || cols == 0) return;
  const dim3 grid(static_cast<unsigned>((cols + 127) / 128),
                  static_cast<unsigned>((rows + 127) / 128));
  quantize_128x128_kernel<T>
      <<<grid, 256, 0, stream>>>(x, rows, cols, ld, pow2, codes, ld_codes, scales, nonfinite);
  FM_CHECK_LAUNCH();
}

template <typename T>
void run_transpose(const T* x, int64_t rows, int64_t cols, int64_t ld, bool pow2, uint8_t* codes,
                   float* scales, uint8_t* codes_t, float* scales_t, ScaleLayout layout,
                   cudaStream_t stream, NonFiniteReport* nonfinite) {
  check_quant_args("quantize_1x128_transpose", rows, cols, ld, x, codes_t, scales_t, nonfinite);
  FM_CHECK_ARG((codes == nullptr) == (scales == nullptr),
               "quantize_1x128_transpose: codes and scales must both be given or both null");
  FM_CHECK_ARG((cols + 127) / 128 < (int64_t{1} << 31),
               "quantize_1x128_transpose: too many columns");
  if (rows == 0 || cols == 0) return;
  const dim3 grid(static_cast<unsigned>((cols + 127) / 128),
                  static_cast<unsigned>((rows + 127) / 128));
  if constexpr (std::is_same_v<T, bf16>) {
    const auto aligned = [](const void* p, uintptr_t n) {
      return reinterpret_cast<uintptr_t>(p) % n == 0;
    };
    // NOTE: the vectorised kernel needs 16-byte rows and whole 16-row slabs; anything else takes
    // the generic kernel (same codes, bit for bit: both tested).
    if (cols % 8 == 0 && ld % 8 == 0 && rows % 16 == 0 && aligned(x, 16) && aligned(codes, 8) &&
        aligned(codes_t, 16)) {
      quantize_transpose_bf16_kernel<<<grid, kQtThreads, 0, stream>>>(
          x, rows, cols, ld, pow2, codes, scales, codes_t, scales_t, layout, nonfinite);
      FM_CHECK_LAUNCH();
      return;
    }
  }
  auto kernel = quantize_transpose_kernel<T>;
  FM_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(kTransposeSmem)));
  kernel<<<grid, 256, kTransposeSmem, stream>>>(x, rows, cols, ld, pow2, codes, scales, codes_t,
                                                scales_t, layout, nonfinite);
  FM_CHECK_LAUNCH();
}

}  // namespace

void reset_nonfinite(NonFiniteReport* report, cudaStream_t stream) {
  FM_CHECK_ARG(report != nullptr, "reset_nonfinite: null report");
  NonFiniteReport init{};
  init.first_key = ~0ull;
  // NOTE: a stack source is fine for cudaMemcpyAsync from pageable memory: it is staged before
  // the call returns.
  FM_CHECK_CUDA(cudaMemcpyAsync(report, &init, sizeof init, cudaMemcpyHostToDevice, stream));
}

void check_nonfinite(const NonFiniteReport* report, const char* what, cudaStream_t stream) {
  FM_CHECK_ARG(report != nullptr, "check_nonfinite: null report");
  NonFiniteReport seen{};
  FM_CHECK_CUDA(cudaMemcpyAsync(&seen, report, sizeof seen, cudaMemcpyDeviceToHost, stream));
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  if (seen.count == 0) return;
  std::string kinds;
  for (auto [bit, name] : {std::pair{1u, "NaN"}, {2u, "+inf"}, {4u, "-inf"}})
    if (seen.kinds & bit) kinds += (kinds.empty() ? "" : ", ") + std::string(name);
  FM_THROW(ErrorKind::kInvalidArgument, what, ": ", seen.count, " non-finite input value",
           seen.count == 1 ? "" : "s", " (", kinds, "); first at row ", seen.first_key >> 24,
           ", column ", seen.first_key & 0xFFFFFFull);
}

void quantize_1x128(const float* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                    uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                    cudaStream_t stream, NonFiniteReport* nonfinite) {
  run_1x128(x, rows, cols, ld, pow2_scales, codes, ld_codes, scales, layout, stream, nonfinite);
}
void quantize_1x128(const bf16* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                    uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                    cudaStream_t stream, NonFiniteReport* nonfinite) {
  run_1x128(x, rows, cols, ld, pow2_scales, codes, ld_codes, scales, layout, stream, nonfinite);
}
void quantize_128x128(const float* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                      uint8_t* codes, int64_t ld_codes, float* scales, cudaStream_t stream,
                      NonFiniteReport* nonfinite) {
  run_128x128(x, rows, cols, ld, pow2_scales, codes, ld_codes, scales, stream, nonfinite);
}
void quantize_128x128(const bf16* x, int64_t rows, int64_t cols, int64_t ld, bool pow2_scales,
                      uint8_t* codes, int64_t ld_codes, float* scales, cudaStream_t stream,
                      NonFiniteReport* nonfinite) {
  run_128x128(x, rows, cols, ld, pow2_scales, codes, ld_codes, scales, stream, nonfinite);
}
void quantize_1x128_transpose(const float* x, int64_t rows, int64_t cols, int64_t ld,
                              bool pow2_scales, uint8_t* codes, float* scales, uint8_t* codes_t,
                              float* scales_t, ScaleLayout layout, cudaStream_t stream,
                              NonFiniteReport* nonfinite) {
  run_transpose(x, rows, cols, ld, pow2_scales, codes, scales, codes_t, scales_t, layout, stream,
                nonfinite);
}
void quantize_1x128_transpose(const bf16* x, int64_t rows, int64_t cols, int64_t ld,
                              bool pow2_scales, uint8_t* codes, float* scales, uint8_t* codes_t,
                              float* scales_t, ScaleLayout layout, cudaStream_t stream,
                              NonFiniteReport* nonfinite) {
  run_transpose(x, rows, cols, ld, pow2_scales, codes, scales, codes_t, scales_t, layout, stream,
                nonfinite);
}

// ---- WeightQuantizer: 128x128 blocks of many weights, each with its transposed copy ----
namespace {

struct WeightQuantRecord {
  WeightQuantJob job;
  int64_t kb;     // k / 128
  int64_t first;  // the job's first block in the launch
};

constexpr int kTileStride = 129;  // bytes: the transposing reads hit 32 different banks

__global__ void __launch_bounds__(256)
    weight_quant_kernel(const WeightQuantRecord* recs, int n_recs) {
  __shared__ uint8_t tile[128 * kTileStride];
  __shared__ float warp_amax[8];
  const int64_t block = blockIdx.x;
  int lo = 0, hi = n_recs - 1;  // the last record with first <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (recs[mid].first <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  const WeightQuantRecord rec = recs[lo];
  const WeightQuantJob& j = rec.job;
  const int64_t local = block - rec.first, bn = local / rec.kb, bk = local % rec.kb;
  const int64_t r0 = bn * 128, c0 = bk * 128;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // A lane holds columns 4 lane .. 4 lane + 3 of rows warp + 8 i: one 16-byte load and one
  // 4-byte store a row.
  float v[16][4];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t r = r0 + warp + 8 * i;
    const float4 q4 = r < j.n
                          ? __ldg(reinterpret_cast<const float4*>(j.master + r * j.k + c0) + lane)
                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    v[i][0] = q4.x, v[i][1] = q4.y, v[i][2] = q4.z, v[i][3] = q4.w;
#pragma unroll
    for (int q = 0; q < 4; ++q) amax = fmaxf(amax, fabsf(v[i][q]));
  }
  amax = block256_max(amax, warp_amax);
  const float scale = scale_for_amax(amax, false);
  const Divisor d = make_divisor(scale);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int row = warp + 8 * i;
    const int64_t r = r0 + row;
    uint32_t word = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint8_t code = encode(v[i][q], d);  // 0 for the rows past n (v = 0)
      tile[row * kTileStride + 4 * lane + q] = code;
      word |= static_cast<uint32_t>(code) << (8 * q);
    }
    if (r < j.n) *reinterpret_cast<uint32_t*>(j.w + r * j.k + c0 + 4 * lane) = word;
  }
  if (threadIdx.x == 0) {
    j.sw[bn * rec.kb + bk] = scale;
    j.swt[bk * j.ldst + bn] = scale;
  }
  __syncthreads();
  // wt rows c0 .. c0 + 127, 4 bytes (rows r0 + 4 lane .. + 3 of w) a lane.
  for (int cc = warp; cc < 128; cc += 8) {
    const uint32_t word = static_cast<uint32_t>(tile[(4 * lane) * kTileStride + cc]) |
                          static_cast<uint32_t>(tile[(4 * lane + 1) * kTileStride + cc]) << 8 |
                          static_cast<uint32_t>(tile[(4 * lane + 2) * kTileStride + cc]) << 16 |
                          static_cast<uint32_t>(tile[(4 * lane + 3) * kTileStride + cc]) << 24;
    *reinterpret_cast<uint32_t*>(j.wt + (c0 + cc) * j.ldt + r0 + 4 * lane) = word;
  }
}

}  // namespace

WeightQuantizer::WeightQuantizer(std::vector<WeightQuantJob> jobs) : jobs_(std::move(jobs)) {
  FM_CHECK_ARG(!jobs_.empty(), "WeightQuantizer: no jobs");
  std::vector<WeightQuantRecord> recs;
  for (size_t i = 0; i < jobs_.size(); ++i) {
    const WeightQuantJob& j = jobs_[i];
    FM_CHECK_ARG(j.n > 0 && j.k > 0 && j.k % 128 == 0, "WeightQuantizer: job ", i, " has shape [",
                 j.n, ", ", j.k, "] (k must be a positive multiple of 128)");
    FM_CHECK_ARG(j.master && j.w && j.sw && j.wt && j.swt, "WeightQuantizer: job ", i,
                 " has a null pointer");
    FM_CHECK_ARG(reinterpret_cast<uintptr_t>(j.master) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(j.w) % 4 == 0,
                 "WeightQuantizer: job ", i, ": master must be 16-byte aligned, w 4-byte aligned");
    const int64_t nb = (j.n + 127) / 128;
    FM_CHECK_ARG(j.ldt >= nb * 128 && j.ldt % 4 == 0 && reinterpret_cast<uintptr_t>(j.wt) % 4 == 0,
                 "WeightQuantizer: job ", i, ": ldt ", j.ldt, " (>= ", nb * 128,
                 ", a multiple of 4, wt 4-byte aligned)");
    FM_CHECK_ARG(j.ldst >= nb, "WeightQuantizer: job ", i, ": ldst ", j.ldst, " < ", nb);
    recs.push_back({j, j.k / 128, blocks_});
    blocks_ += nb * (j.k / 128);
  }
  FM_CHECK_ARG(blocks_ < (int64_t{1} << 31), "WeightQuantizer: ", blocks_, " blocks");
  FM_CHECK_CUDA(cudaMalloc(&table_, recs.size() * sizeof(WeightQuantRecord)));
  FM_CHECK_CUDA(cudaMemcpy(table_, recs.data(), recs.size() * sizeof(WeightQuantRecord),
                           cudaMemcpyHostToDevice));
}

WeightQuantizer::~WeightQuantizer() {
  cudaFree(table_);
}

void WeightQuantizer::run(cudaStream_t stream) const {
  weight_quant_kernel<<<static_cast<unsigned>(blocks_), 256, 0, stream>>>(
      static_cast<const WeightQuantRecord*>(table_), static_cast<int>(jobs_.size()));
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
