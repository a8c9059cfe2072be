// The latent form's per-head products on tensor cores (kernels/mla_absorb.h, the _tc forms):
// BF16 WMMA 16 x 16 x 16 tiles with FP32 accumulation. The E4M3 codes convert to BF16 exactly, so
// a 128-long block's sum is sum_d q[d] code[d] on the tensor cores (their order), and the block's
// FP32 scale multiplies the sum once; the CUDA-core forms (mla_absorb.cu) dequantise each weight
// first and add in index order — the two differ by rounding (about one BF16 unit of the result).
// A CTA = one head x 128 output columns x 32 tokens; 4 warps of 16 tokens x 64 columns.
// Test: test_kernels_gpu --gtest_filter='MlaAbsorbGpu*'. Bench: mla_absorb_bench.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_absorb.h"
#include "mla_absorb_common.cuh"

namespace fp8moe::kernels {

// mla_absorb.cu: the token slices of a grid, 32 tokens a slice (kTileTokens here).
unsigned mla_absorb_token_slices(int64_t tokens, int64_t ctas);

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128, kTileTokens = 32, kLd = 136;  // kLd: BF16 row pitch (bank spread)

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// A 128 x 128 block of codes (rows row0.., columns col0.. of a [*, ld] E4M3 matrix) as BF16 in
// shared memory, w[r][c] (exact: every E4M3 value is a BF16 value).
__device__ __forceinline__ void stage_codes(__nv_bfloat16 (*w)[kLd], const uint8_t* codes,
                                            int64_t ld, int64_t row0, int64_t col0) {
  for (int i = static_cast<int>(threadIdx.x); i < 128 * 32; i += kThreads) {
    const int r = i / 32, c = 4 * (i % 32);
    const uint32_t four = *reinterpret_cast<const uint32_t*>(codes + (row0 + r) * ld + col0 + c);
#pragma unroll
    for (int b = 0; b < 4; ++b)
      w[r][c + b] = __float2bfloat16_rn(e4m3_bits_to_float(static_cast<uint8_t>(four >> (8 * b))));
  }
}

// 32 tokens' 128 values at src + (t * heads + h) * row + col0 as BF16 rows of s (zero past T).
__device__ __forceinline__ void stage_rows(__nv_bfloat16 (*s)[kLd], const bf16* src, int64_t t0,
                                           int64_t tokens, int64_t heads, int64_t h, int64_t row,
                                           int64_t col0) {
  for (int i = static_cast<int>(threadIdx.x); i < kTileTokens * 16; i += kThreads) {
    const int r = i / 16, c = 8 * (i % 16);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (t0 + r < tokens)
      v = *reinterpret_cast<const uint4*>(src + ((t0 + r) * heads + h) * row + col0 + c);
    *reinterpret_cast<uint4*>(&s[r][c]) = v;
  }
}

// Absorb: grid (latent / 128, heads, token slices). out[t, j] = s * sum_d q[t, d] code[d, j].
__global__ void __launch_bounds__(kThreads)
    absorb_tc_kernel(const bf16* q, int64_t tokens, MlaAbsorbDims d, const uint8_t* codes,
                     const float* scales, bf16* q_lat) {
  __shared__ __align__(32) __nv_bfloat16 w[128][kLd];  // W_UK[h][d, j0 + c]
  __shared__ __align__(32) __nv_bfloat16 qs[kTileTokens][kLd];
  __shared__ __align__(32) float stage[4][16][16];  // a warp's fragment on its way out
  const int64_t h = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * 128;
  const int64_t qd = d.nope_dim + d.rope_dim, od = d.latent_dim + d.rope_dim;
  const int64_t row0 = h * (d.nope_dim + d.value_dim);
  const float s = scales[(row0 / 128) * (d.latent_dim / 128) + blockIdx.x];
  stage_codes(w, codes, d.latent_dim, row0, j0);
  const int warp = static_cast<int>(threadIdx.x) / 32, wr = 16 * (warp % 2), wc = 64 * (warp / 2);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.z) * kTileTokens; t0 < tokens;
       t0 += static_cast<int64_t>(gridDim.z) * kTileTokens) {
    __syncthreads();  // the codes staged; the previous tile's rows and sums read
    stage_rows(qs, q, t0, tokens, d.heads, h, qd, 0);
    __syncthreads();
    FragC acc[4];
#pragma unroll
    for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
    for (int k = 0; k < 128; k += 16) {
      FragA a;
      wmma::load_matrix_sync(a, &qs[wr][k], kLd);
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        FragBRow b;
        wmma::load_matrix_sync(b, &w[k][wc + 16 * n], kLd);
        wmma::mma_sync(acc[n], a, b, acc[n]);
      }
    }
    const int lane = static_cast<int>(threadIdx.x) % 32;
    for (int n = 0; n < 4; ++n) {
      wmma::store_matrix_sync(&stage[warp][0][0], acc[n], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t t = t0 + wr + e / 16;
        if (t < tokens)
          q_lat[(t * d.heads + h) * od + j0 + wc + 16 * n + e % 16] =
              to_bf16(stage[warp][e / 16][e % 16] * s);
      }
      __syncwarp();
    }
    const int n_rows = static_cast<int>(tokens - t0 < kTileTokens ? tokens - t0 : kTileTokens);
    if (blockIdx.x == 0) copy_q_pe(q, q_lat, d, h, t0, n_rows);
  }
}

// Unabsorb: grid (heads, token slices). out[t, v] = sum over latent blocks cb of
// s_cb * sum_j o[t, cb 128 + j] code[v, cb 128 + j].
__global__ void __launch_bounds__(kThreads)
    unabsorb_tc_kernel(const bf16* o_lat, int64_t tokens, MlaAbsorbDims d, const uint8_t* codes,
                       const float* scales, bf16* attn) {
  __shared__ __align__(32) __nv_bfloat16 w[128][kLd];  // W_UV[h][v, cb 128 + j] as w[v][j]
  __shared__ __align__(32) __nv_bfloat16 os[kTileTokens][kLd];
  __shared__ __align__(32) float stage[4][16][16];
  const int64_t h = blockIdx.x;
  const int64_t row0 = h * (d.nope_dim + d.value_dim) + d.nope_dim;
  const int warp = static_cast<int>(threadIdx.x) / 32, wr = 16 * (warp % 2), wc = 64 * (warp / 2);
  const int64_t blocks = d.latent_dim / 128;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTileTokens; t0 < tokens;
       t0 += static_cast<int64_t>(gridDim.y) * kTileTokens) {
    FragC total[4];
#pragma unroll
    for (int n = 0; n < 4; ++n) wmma::fill_fragment(total[n], 0.0f);
    for (int64_t cb = 0; cb < blocks; ++cb) {
      __syncthreads();  // the previous block's codes and rows read
      stage_codes(w, codes, d.latent_dim, row0, cb * 128);
      stage_rows(os, o_lat, t0, tokens, d.heads, h, d.latent_dim, cb * 128);
      __syncthreads();
      const float s = scales[(row0 / 128) * blocks + cb];
      FragC part[4];
#pragma unroll
      for (int n = 0; n < 4; ++n) wmma::fill_fragment(part[n], 0.0f);
#pragma unroll
      for (int k = 0; k < 128; k += 16) {
        FragA a;
        wmma::load_matrix_sync(a, &os[wr][k], kLd);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          FragBCol b;  // element (j, v) = w[v][j]
          wmma::load_matrix_sync(b, &w[wc + 16 * n][k], kLd);
          wmma::mma_sync(part[n], a, b, part[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < part[n].num_elements; ++e)
          total[n].x[e] = __fmaf_rn(part[n].x[e], s, total[n].x[e]);
    }
    const int lane = static_cast<int>(threadIdx.x) % 32;
    for (int n = 0; n < 4; ++n) {
      wmma::store_matrix_sync(&stage[warp][0][0], total[n], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t t = t0 + wr + e / 16;
        if (t < tokens)
          attn[(t * d.heads + h) * d.value_dim + wc + 16 * n + e % 16] =
              to_bf16(stage[warp][e / 16][e % 16]);
      }
      __syncwarp();
    }
  }
}

void check_ptr16(const char* who, const char* name, const void* p) {
  FM_CHECK_ARG(p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0, who, ": ", name,
               " must be a 16-byte aligned device pointer (got ", p, ")");
}

}  // namespace

void mla_absorb_query_tc(const bf16* q, int64_t tokens, const MlaAbsorbDims& d,
                         const uint8_t* w_codes, const float* w_scales, bf16* q_lat,
                         cudaStream_t stream) {
  mla_absorb_check_dims("mla_absorb_query_tc", d, tokens);
  if (tokens == 0) return;
  check_ptr16("mla_absorb_query_tc", "q", q);
  const int64_t ctas = d.latent_dim / 128 * d.heads;
  absorb_tc_kernel<<<dim3(static_cast<unsigned>(d.latent_dim / 128), static_cast<unsigned>(d.heads),
                          mla_absorb_token_slices(tokens, ctas)),
                     kThreads, 0, stream>>>(q, tokens, d, w_codes, w_scales, q_lat);
  FM_CHECK_CUDA(cudaGetLastError());
}

void mla_unabsorb_output_tc(const bf16* o_lat, int64_t tokens, const MlaAbsorbDims& d,
                            const uint8_t* w_codes, const float* w_scales, bf16* attn,
                            cudaStream_t stream) {
  mla_absorb_check_dims("mla_unabsorb_output_tc", d, tokens);
  if (tokens == 0) return;
  check_ptr16("mla_unabsorb_output_tc", "o_lat", o_lat);
  unabsorb_tc_kernel<<<dim3(static_cast<unsigned>(d.heads),
                            mla_absorb_token_slices(tokens, d.heads)),
                       kThreads, 0, stream>>>(o_lat, tokens, d, w_codes, w_scales, attn);
  FM_CHECK_CUDA(cudaGetLastError());
}

}  // namespace fp8moe::kernels
