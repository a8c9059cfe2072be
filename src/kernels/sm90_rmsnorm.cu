// RMSNorm forward (optionally fused with the 1x128 E4M3 quantisation of y) and backward, BF16
// activations, FP32 weight: a block per row (forward) or per chunk of rows (backward), each thread
// 16-byte vectors of 8 elements held in registers; row sums in the fixed order of rmsnorm.h; dw by
// a deterministic two-stage reduction (per-chunk partials in a workspace, then a column sum).
// Checked bit for bit against rmsnorm_*_reference (src/kernels/rmsnorm_reference.cpp):
// `test_kernels_gpu --gtest_filter='RmsNormGpu*'`.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "bf16_vector.cuh"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/rmsnorm.h"

namespace fp8moe::kernels {
namespace {

constexpr int kVec = RmsNormPlan::kVecPerThread;
constexpr int kMaxThreads = 512;  // dim <= 512 * 4 * 8 = 16384 (check_rmsnorm_shape)
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kDwGroups = RmsNormPlan::kDwGroups;
static_assert(kDwGroups * 32 <= 1024, "stage 2 is one block of 32 columns x kDwGroups");

__device__ __forceinline__ void load_w8(const float* w, int64_t v, float* out) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(w) + 2 * v);
  const float4 b = __ldg(reinterpret_cast<const float4*>(w) + 2 * v + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// The row sum of every thread's `acc` in rmsnorm.h's order: warp butterfly, then the warp sums in
// warp order. `ws` holds kMaxWarps floats; the caller alternates two of them between rows so that
// one barrier a row suffices.
__device__ __forceinline__ float block_sum(float acc, float* ws) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xFFFFFFFFu, acc, o));
  if (threadIdx.x % 32 == 0) ws[threadIdx.x / 32] = acc;
  __syncthreads();
  float s = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) s = __fadd_rn(s, ws[i]);
  return s;
}

__device__ __forceinline__ float rstd_of(float ss, float dim, float eps) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, dim), eps)));
}

// Rare path, so plain atomics (as sm90_fp8_quantize.cu's note_nonfinite).
__device__ __noinline__ void note_nonfinite(NonFiniteReport* report, float v, int64_t row,
                                            int64_t col) {
  atomicAdd(&report->count, 1ull);
  atomicMin(&report->first_key,
            (static_cast<unsigned long long>(row) << 24) | static_cast<unsigned long long>(col));
  atomicOr(&report->kinds, isnan(v) ? 1u : (v > 0.0f ? 2u : 4u));
}

// The CPU's fp8_scale_for_amax, operation for operation (as sm90_fp8_quantize.cu).
__device__ __forceinline__ float scale_for_amax(float amax, bool pow2) {
  float scale = amax > 0.0f ? fmaxf(__fdiv_rn(amax, kE4M3Max), FLT_MIN) : 1.0f;
  if (pow2) scale = round_up_pow2(scale);
  return scale;
}

struct QuantOut {  // the fused form's outputs (codes null: plain forward)
  uint8_t* codes;
  int64_t ld_codes;
  float* scales;
  int64_t padded;  // kMnMajor: padded_rows(rows); 0 for kRowMajor
  bool pow2;
  NonFiniteReport* nonfinite;
};

// ---- forward: a block per row (launched rows beyond `rows` only write M-major padding scales) --
template <bool kQuant>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_kernel(const bf16* x, int64_t ld_x, const float* w, int64_t rows, int64_t dim,
                           float eps, bf16* y, int64_t ld_y, float* rstd, QuantOut q) {
  __shared__ float ws[kMaxWarps];
  const int64_t r = blockIdx.x;
  const int64_t nvec = dim / 8, tiles = dim / 128;
  const int t = threadIdx.x, T = blockDim.x;
  if (r >= rows) {  // kMnMajor padding entries (kQuant only launches these rows)
    for (int64_t tile = t; tile < tiles; tile += T) q.scales[tile * q.padded + r] = 0.0f;
    return;
  }
  // Load the row; sum x * x.
  uint4 xv[kVec];
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t v = t + static_cast<int64_t>(k) * T;
    if (v < nvec) {
      xv[k] = __ldg(reinterpret_cast<const uint4*>(x + r * ld_x) + v);
      float f[8];
      unpack_bf16x8(xv[k], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc = __fadd_rn(acc, __fmul_rn(f[e], f[e]));
      if constexpr (kQuant) {
        if (q.nonfinite != nullptr) [[unlikely]] {
          for (int e = 0; e < 8; ++e)
            if (!isfinite(f[e])) note_nonfinite(q.nonfinite, f[e], r, v * 8 + e);
        }
      }
    }
  }
  const float rs = rstd_of(block_sum(acc, ws), static_cast<float>(dim), eps);
  if (rstd != nullptr && t == 0) rstd[r] = rs;

    // y = bf16((x * rstd) * w); the fused form quantises y's BF16 values per 128-column tile, whose
    // 16 vectors are 16 consecutive lanes of one k (T is a multiple of 32).
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t v = t + static_cast<int64_t>(k) * T;
    const bool valid = v < nvec;
    float yf[8];
    uint4 yb = make_uint4(0, 0, 0, 0);
    if (valid) {
      float f[8], wv[8];
      unpack_bf16x8(xv[k], f);
      load_w8(w, v, wv);
#pragma unroll
      for (int e = 0; e < 8; ++e) yf[e] = __fmul_rn(__fmul_rn(f[e], rs), wv[e]);
      yb = pack_bf16x8(yf);
      if (y != nullptr) *(reinterpret_cast<uint4*>(y + r * ld_y) + v) = yb;
    }
    if constexpr (kQuant) {
      // NOTE: every lane of the warp reaches the shuffles; a 16-lane tile group is wholly valid
      // or wholly past the row (dim % 128 == 0), so invalid groups only compute garbage amax.
      unpack_bf16x8(yb, yf);
      float amax = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(yf[e]));
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
      if (valid) {
        const float scale = scale_for_amax(amax, q.pow2);
        uint32_t c[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          c[e] = __nv_cvt_float2_to_fp8x2(
              make_float2(__fdiv_rn(yf[2 * e], scale), __fdiv_rn(yf[2 * e + 1], scale)),
              __NV_SATFINITE, __NV_E4M3);
        *reinterpret_cast<uint2*>(q.codes + r * q.ld_codes + v * 8) =
            make_uint2(c[0] | (c[1] << 16), c[2] | (c[3] << 16));
        if (v % 16 == 0) {
          const int64_t tile = v / 16;
          q.scales[q.padded > 0 ? tile * q.padded + r : r * tiles + tile] = scale;
        }
      }
    }
  }
}

// ---- backward stage 1: a block per chunk of rows; dx per row, dw partials in registers ----
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_backward_kernel(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x,
                            const float* w, const float* rstd, int64_t rows, int64_t dim,
                            int64_t chunk_rows, bf16* dx, int64_t ld_dx, float* partial) {
  __shared__ float ws[2][kMaxWarps];
  const int64_t nvec = dim / 8;
  const int t = threadIdx.x, T = blockDim.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * chunk_rows;
  const int64_t r1 = min(rows, r0 + chunk_rows);
  // NOTE: w is re-read from L1 for each row rather than held, and the dw partials live in shared
  // memory (each thread only ever touches its own columns: no barrier, no atomics): 100 -> ~70
  // registers, so 4 blocks of 224 threads fit an SM instead of 2.
  extern __shared__ float4 dw_acc[];  // [dim / 4]
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t v = t + static_cast<int64_t>(k) * T;
    if (v < nvec) dw_acc[2 * v] = dw_acc[2 * v + 1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int64_t r = r0; r < r1; ++r) {
    // Load the row of x and dy; dot = sum (dy * w) * x.
    uint4 xv[kVec], dv[kVec];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t v = t + static_cast<int64_t>(k) * T;
      if (v < nvec) {
        xv[k] = __ldg(reinterpret_cast<const uint4*>(x + r * ld_x) + v);
        dv[k] = *(reinterpret_cast<const uint4*>(dy + r * ld_dy) + v);  // may alias dx
        float xf[8], df[8], wv[8];
        unpack_bf16x8(xv[k], xf);
        unpack_bf16x8(dv[k], df);
        load_w8(w, v, wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(df[e], wv[e]), xf[e]));
      }
    }
    const float rs = __ldg(rstd + r);
    const float dot = block_sum(acc, ws[r & 1]);
    const float coef =
        __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(dot, rs), rs), rs), static_cast<float>(dim));
    // dx = (rstd * dy) * w - coef * x; dw partial += (dy * x) * rstd.
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t v = t + static_cast<int64_t>(k) * T;
      if (v < nvec) {
        float xf[8], df[8], wv[8], o[8], a[8];
        unpack_bf16x8(xv[k], xf);
        unpack_bf16x8(dv[k], df);
        load_w8(w, v, wv);
        const float4 a0 = dw_acc[2 * v], a1 = dw_acc[2 * v + 1];
        a[0] = a0.x, a[1] = a0.y, a[2] = a0.z, a[3] = a0.w;
        a[4] = a1.x, a[5] = a1.y, a[6] = a1.z, a[7] = a1.w;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          o[e] = __fsub_rn(__fmul_rn(__fmul_rn(rs, df[e]), wv[e]), __fmul_rn(coef, xf[e]));
          a[e] = __fadd_rn(a[e], __fmul_rn(__fmul_rn(df[e], xf[e]), rs));
        }
        dw_acc[2 * v] = make_float4(a[0], a[1], a[2], a[3]);
        dw_acc[2 * v + 1] = make_float4(a[4], a[5], a[6], a[7]);
        *(reinterpret_cast<uint4*>(dx + r * ld_dx) + v) = pack_bf16x8(o);
      }
    }
  }
  float* out = partial + static_cast<int64_t>(blockIdx.x) * dim;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t v = t + static_cast<int64_t>(k) * T;
    if (v < nvec) {
      reinterpret_cast<float4*>(out)[2 * v] = dw_acc[2 * v];
      reinterpret_cast<float4*>(out)[2 * v + 1] = dw_acc[2 * v + 1];
    }
  }
}

// ---- backward stage 2: 32 columns a block; threadIdx.y sums one group of chunks in order ----
__global__ void __launch_bounds__(32 * kDwGroups)
    rmsnorm_dw_kernel(const float* partial, int64_t chunks, int64_t dim, float* dw,
                      bool accumulate) {
  __shared__ float gs[kDwGroups][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t group = (chunks + kDwGroups - 1) / kDwGroups;
  const int j = threadIdx.y;
  float s = 0.0f;
  if (c < dim) {
    const int64_t p1 = min(chunks, (j + 1) * group);
    for (int64_t p = j * group; p < p1; ++p) s = __fadd_rn(s, __ldg(partial + p * dim + c));
  }
  gs[j][threadIdx.x] = s;
  __syncthreads();
  if (j != 0 || c >= dim) return;
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kDwGroups; ++i) total = __fadd_rn(total, gs[i][threadIdx.x]);
  dw[c] = accumulate ? __fadd_rn(dw[c], total) : total;
}

bool aligned(const void* p, uintptr_t a) {
  return reinterpret_cast<uintptr_t>(p) % a == 0;
}

// NOTE: with rows == 0 nothing is read or written, so null pointers pass.
void check_rows_arg(const char* what, const void* p, int64_t rows, int64_t ld, int64_t dim,
                    const char* name) {
  FM_CHECK_ARG((rows == 0 || p != nullptr) && aligned(p, 16), what, ": ", name,
               " must be a 16-byte aligned device pointer");
  FM_CHECK_ARG(ld >= dim && ld % 8 == 0, what, ": ld of ", name, " = ", ld, " must be >= dim=", dim,
               " and a multiple of 8");
}

void launch_forward(const char* what, bool quant, const bf16* x, int64_t ld_x, const float* w,
                    int64_t rows, int64_t dim, double eps, bf16* y, int64_t ld_y, float* rstd,
                    QuantOut q, cudaStream_t stream) {
  check_rmsnorm_shape(what, rows, dim, quant);
  check_rows_arg(what, x, rows, ld_x, dim, "x");
  if (y != nullptr || !quant) check_rows_arg(what, y, rows, ld_y, dim, "y");
  FM_CHECK_ARG(w != nullptr && aligned(w, 16), what, ": w must be a 16-byte aligned pointer");
  FM_CHECK_ARG(std::isfinite(eps) && eps >= 0, what, ": eps=", eps, " must be finite, >= 0");
  if (quant) {
    FM_CHECK_ARG(
        q.codes != nullptr && aligned(q.codes, 8) && q.ld_codes >= dim && q.ld_codes % 8 == 0, what,
        ": codes must be 8-byte aligned with ld_codes (", q.ld_codes,
        ") >= dim and a multiple of 8");
    FM_CHECK_ARG(q.scales != nullptr, what, ": scales must not be null");
  }
  const RmsNormPlan plan = rmsnorm_plan(rows, dim);
  const int64_t blocks = quant && q.padded > 0 ? q.padded : rows;
  if (blocks == 0) return;
  if (quant)
    rmsnorm_forward_kernel<true><<<static_cast<unsigned>(blocks), plan.threads, 0, stream>>>(
        x, ld_x, w, rows, dim, static_cast<float>(eps), y, ld_y, rstd, q);
  else
    rmsnorm_forward_kernel<false><<<static_cast<unsigned>(blocks), plan.threads, 0, stream>>>(
        x, ld_x, w, rows, dim, static_cast<float>(eps), y, ld_y, rstd, q);
  FM_CHECK_LAUNCH();
}

}  // namespace

void rmsnorm_forward(const bf16* x, int64_t ld_x, const float* w, int64_t rows, int64_t dim,
                     double eps, bf16* y, int64_t ld_y, float* rstd, cudaStream_t stream) {
  launch_forward("rmsnorm_forward", false, x, ld_x, w, rows, dim, eps, y, ld_y, rstd,
                 QuantOut{nullptr, 0, nullptr, 0, false, nullptr}, stream);
}

void rmsnorm_forward_quantize_1x128(const bf16* x, int64_t ld_x, const float* w, int64_t rows,
                                    int64_t dim, double eps, bf16* y, int64_t ld_y, float* rstd,
                                    bool pow2_scales, uint8_t* codes, int64_t ld_codes,
                                    float* scales, ScaleLayout layout, cudaStream_t stream,
                                    NonFiniteReport* nonfinite) {
  const int64_t padded = layout == ScaleLayout::kMnMajor ? (rows + 3) / 4 * 4 : 0;
  launch_forward("rmsnorm_forward_quantize_1x128", true, x, ld_x, w, rows, dim, eps, y, ld_y, rstd,
                 QuantOut{codes, ld_codes, scales, padded, pow2_scales, nonfinite}, stream);
}

void rmsnorm_backward(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x, const float* w,
                      const float* rstd, int64_t rows, int64_t dim, bf16* dx, int64_t ld_dx,
                      float* dw, bool accumulate, float* workspace, cudaStream_t stream) {
  const char* what = "rmsnorm_backward";
  check_rmsnorm_shape(what, rows, dim, false);
  check_rows_arg(what, dy, rows, ld_dy, dim, "dy");
  check_rows_arg(what, x, rows, ld_x, dim, "x");
  check_rows_arg(what, dx, rows, ld_dx, dim, "dx");
  FM_CHECK_ARG(w != nullptr && aligned(w, 16), what, ": w must be a 16-byte aligned pointer");
  FM_CHECK_ARG(dw != nullptr, what, ": dw must not be null");
  const RmsNormPlan plan = rmsnorm_plan(rows, dim);
  FM_CHECK_ARG(
      plan.chunks == 0 || (rstd != nullptr && workspace != nullptr && aligned(workspace, 16)), what,
      ": rstd and a 16-byte aligned workspace of ", plan.workspace_floats,
      " floats are needed (rows=", rows, ", dim=", dim, ")");
  if (plan.chunks > 0) {
    // dim floats of dynamic shared memory: up to 64 KB (dim 16384), above the 48 KB default.
    const size_t smem = static_cast<size_t>(dim) * sizeof(float);
    // NOTE: set per call (the attribute is per device), only for the rare dims that need it.
    if (smem > 48 * 1024)
      FM_CHECK_CUDA(cudaFuncSetAttribute(rmsnorm_backward_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
    rmsnorm_backward_kernel<<<static_cast<unsigned>(plan.chunks), plan.threads, smem, stream>>>(
        dy, ld_dy, x, ld_x, w, rstd, rows, dim, plan.chunk_rows, dx, ld_dx, workspace);
    FM_CHECK_LAUNCH();
  }
  rmsnorm_dw_kernel<<<static_cast<unsigned>((dim + 31) / 32), dim3(32, kDwGroups), 0, stream>>>(
      workspace, plan.chunks, dim, dw, accumulate);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe::kernels
