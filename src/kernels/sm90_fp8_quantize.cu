// Fine-grained E4M3 quantisation on the GPU: 1x128 per token (a warp per 128-element tile, amax by
// shuffles), 128x128 blocks (a CTA per block), and the fused 1x128 cast + transpose (a CTA per
// 128x128 tile staged in shared memory, rows then columns). Bit-exact against the CPU
// fp8moe::quantize: `build-device/tests/test_kernels_gpu --gtest_filter='Quantize*'`.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <string>
#include <utility>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
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
  float scale = amax > 0.0f ? fmaxf(__fdiv_rn(amax, kE4M3Max), FLT_MIN) : 1.0f;
  if (pow2) scale = round_up_pow2(scale);
  return scale;
}
__device__ __forceinline__ uint8_t encode(float x, float scale) {
  return float_to_e4m3_bits(__fdiv_rn(x, scale));
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
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = tile * 128 + lane + 32 * j;
    if (c < cols) codes[row * ld_codes + c] = encode(v[j], scale);
  }
  if (lane == 0) scales[scale_index(layout, row, tile, rows, tiles)] = scale;
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
  amax = warp_max(amax);
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  amax = warp_amax[0];
#pragma unroll
  for (int w = 1; w < 8; ++w) amax = fmaxf(amax, warp_amax[w]);
  const float scale = scale_for_amax(amax, pow2);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t r = r0 + warp + 8 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + lane + 32 * j;
      if (r < rows && c < cols) codes[r * ld_codes + c] = encode(v[i][j], scale);
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
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + lane + 32 * j;
        if (c < cols)
          codes[(r0 + r) * cols + c] = encode(tile[r * kTStride + lane + 32 * j], scale);
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
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + lane + 32 * j;
      if (r < rows)
        codes_t[(c0 + c) * rows + r] = encode(tile[(lane + 32 * j) * kTStride + c], scale);
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
  auto kernel = quantize_transpose_kernel<T>;
  FM_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(kTransposeSmem)));
  const dim3 grid(static_cast<unsigned>((cols + 127) / 128),
                  static_cast<unsigned>((rows + 127) / 128));
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

}  // namespace fp8moe::kernels
