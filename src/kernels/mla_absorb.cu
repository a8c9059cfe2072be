// The latent form's per-head products and cache append (kernels/mla_absorb.h). A CTA = one head
// x 128 output columns x a slice of the tokens; each thread keeps its column's 128 dequantised
// weights in registers and walks its slice's tokens in chunks of 32 staged in shared memory
// (every thread reads the same value: a broadcast). FMAs in index order, as the CPU reference (bit
// for bit), whatever the slicing: an output's sum is one thread's, in the same order.
// Until session 25 a CTA walked every token: a prefill pass of thousands of tokens ran on
// heads x latent / 128 CTAs (16 on small-gpu) and these two kernels took 79-92 % of its kernel
// time (docs/serve/runs/s25-call9.sh's ncu); the token slices fill the GPU.
// Test: test_kernels_gpu --gtest_filter='MlaAbsorbGpu*'.
#include <cuda_runtime.h>

#include <algorithm>
#include <utility>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_absorb.h"
#include "mla_absorb_common.cuh"

namespace fp8moe::kernels {

namespace {

constexpr int kCols = 128, kTokenChunk = 32;

// One 128 x 128 block of kv_b's codes (rows row0.., columns col0..) staged in shared memory by
// the CTA's 128 threads with coalesced 4-byte loads (one thread a column or a row reading them
// from global memory one byte at a time left the loads in series: ~65 us a call, session 23's
// ncu). Rows 132 bytes apart: a warp reading one row's consecutive bytes or 32 rows' same byte
// meets no bank twice.
constexpr int kStageRow = 132;

__device__ __forceinline__ void stage_block(uint8_t (*tile)[kStageRow], const uint8_t* codes,
                                            int64_t latent, int64_t row0, int64_t col0) {
  for (int i = static_cast<int>(threadIdx.x); i < 128 * 32; i += kCols) {
    const int r = i / 32, w = i % 32;
    *reinterpret_cast<uint32_t*>(&tile[r][4 * w]) =
        *reinterpret_cast<const uint32_t*>(codes + (row0 + r) * latent + col0 + 4 * w);
  }
  __syncthreads();
}

// Absorb: grid (latent / 128, heads, token slices); thread = latent column j; w = W_UK[h][:, j].
__global__ void __launch_bounds__(kCols)
    absorb_kernel(const bf16* q, int64_t tokens, MlaAbsorbDims d, const uint8_t* codes,
                  const float* scales, bf16* q_lat) {
  __shared__ float qs[kTokenChunk][128];
  __shared__ __align__(16) uint8_t tile[128][kStageRow];
  const int64_t h = blockIdx.y, j = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t qd = d.nope_dim + d.rope_dim, od = d.latent_dim + d.rope_dim;
  const int64_t row0 = h * (d.nope_dim + d.value_dim);
  stage_block(tile, codes, d.latent_dim, row0, static_cast<int64_t>(blockIdx.x) * kCols);
  const float s = scales[(row0 / 128) * (d.latent_dim / 128) + j / 128];
  float w[128];
#pragma unroll
  for (int k = 0; k < 128; ++k) w[k] = e4m3_bits_to_float(tile[k][threadIdx.x]) * s;
  const int64_t step = static_cast<int64_t>(gridDim.z) * kTokenChunk;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.z) * kTokenChunk; t0 < tokens; t0 += step) {
    const int n = static_cast<int>(tokens - t0 < kTokenChunk ? tokens - t0 : kTokenChunk);
    __syncthreads();
    for (int i = threadIdx.x; i < n * 128; i += kCols)
      qs[i / 128][i % 128] = to_float(q[((t0 + i / 128) * d.heads + h) * qd + i % 128]);
    __syncthreads();
    for (int tt = 0; tt < n; ++tt) {
      float acc = 0.0f;
#pragma unroll
      for (int k = 0; k < 128; ++k) acc = __fmaf_rn(qs[tt][k], w[k], acc);
      q_lat[((t0 + tt) * d.heads + h) * od + j] = to_bf16(acc);
    }
    if (blockIdx.x == 0) copy_q_pe(q, q_lat, d, h, t0, n);
  }
}

// Unabsorb: grid (heads, token slices); thread = value column v; the latent reduction in 128-wide
// blocks, one register set of W_UV[h][v, block] at a time, 32 tokens' sums carried across the
// blocks.
__global__ void __launch_bounds__(kCols)
    unabsorb_kernel(const bf16* o_lat, int64_t tokens, MlaAbsorbDims d, const uint8_t* codes,
                    const float* scales, bf16* attn) {
  __shared__ float os[kTokenChunk][128];
  __shared__ __align__(16) uint8_t tile[128][kStageRow];
  const int64_t h = blockIdx.x, v = threadIdx.x;
  const int64_t row0 = h * (d.nope_dim + d.value_dim) + d.nope_dim, row = row0 + v;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kTokenChunk;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTokenChunk; t0 < tokens; t0 += step) {
    const int n = static_cast<int>(tokens - t0 < kTokenChunk ? tokens - t0 : kTokenChunk);
    float acc[kTokenChunk];
#pragma unroll
    for (int tt = 0; tt < kTokenChunk; ++tt) acc[tt] = 0.0f;
    for (int64_t cb = 0; cb < d.latent_dim / 128; ++cb) {
      __syncthreads();  // the previous block's tile and rows are read
      stage_block(tile, codes, d.latent_dim, row0, cb * 128);
      float w[128];
      const float s = scales[(row / 128) * (d.latent_dim / 128) + cb];
#pragma unroll
      for (int k = 0; k < 128; ++k) w[k] = e4m3_bits_to_float(tile[v][k]) * s;
      for (int i = threadIdx.x; i < n * 128; i += kCols)
        os[i / 128][i % 128] =
            to_float(o_lat[((t0 + i / 128) * d.heads + h) * d.latent_dim + cb * 128 + i % 128]);
      __syncthreads();
#pragma unroll
      for (int tt = 0; tt < kTokenChunk; ++tt) {
        if (tt >= n) break;
        float a = acc[tt];
#pragma unroll
        for (int k = 0; k < 128; ++k) a = __fmaf_rn(os[tt][k], w[k], a);
        acc[tt] = a;
      }
    }
#pragma unroll
    for (int tt = 0; tt < kTokenChunk; ++tt)
      if (tt < n) attn[((t0 + tt) * d.heads + h) * d.value_dim + v] = to_bf16(acc[tt]);
  }
}

// Append: one thread a 16-byte chunk of a token's cache row.
__global__ void append_kernel(const bf16* latent, int64_t ld_latent, const bf16* k_pe,
                              int64_t ld_k_pe, int64_t tokens, int queries, int latent_dim,
                              int rope_dim, const int32_t* page_table, int max_pages,
                              int page_tokens, const int32_t* seq_lens, bf16* cache) {
  const int chunks = (latent_dim + rope_dim) / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tokens * chunks) return;
  const int64_t t = idx / chunks;
  const int c = static_cast<int>(idx % chunks);
  const int64_t b = t / queries;
  const int pos = seq_lens[b] - queries + static_cast<int>(t % queries);
  if (pos < 0 || pos >= max_pages * page_tokens) return;
  const int page = page_table[b * max_pages + pos / page_tokens];
  const bf16* src = c * 8 < latent_dim ? latent + t * ld_latent + c * 8
                                       : k_pe + t * ld_k_pe + (c * 8 - latent_dim);
  bf16* dst =
      cache +
      (static_cast<int64_t>(page) * page_tokens + pos % page_tokens) * (latent_dim + rope_dim) +
      c * 8;
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

void check_ptr(const char* who, const char* name, const void* p) {
  FM_CHECK_ARG(p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0, who, ": ", name,
               " must be a 16-byte aligned device pointer (got ", p, ")");
}

}  // namespace

// Token slices a grid takes (mla_absorb.cu's and mla_absorb_tc.cu's): one chunk of 32 tokens a
// slice, at most enough for ~4 CTAs an SM
// of an H100 / H200 (132 SMs) over the other grid dimensions' `ctas`; each slice's CTA restages
// and dequantises its weights once (128 x 128 codes), ~3 % of a full chunk's FMAs.
unsigned mla_absorb_token_slices(int64_t tokens, int64_t ctas) {
  const int64_t chunks = (tokens + kTokenChunk - 1) / kTokenChunk;
  const int64_t want = (4 * 132 + ctas - 1) / ctas;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>({chunks, want, 65535})));
}

void mla_absorb_query(const bf16* q, int64_t tokens, const MlaAbsorbDims& d, const uint8_t* w_codes,
                      const float* w_scales, bf16* q_lat, cudaStream_t stream) {
  mla_absorb_check_dims("mla_absorb_query", d, tokens);
  if (tokens == 0) return;
  const int64_t ctas = d.latent_dim / kCols * d.heads;
  absorb_kernel<<<dim3(static_cast<unsigned>(d.latent_dim / kCols), static_cast<unsigned>(d.heads),
                       mla_absorb_token_slices(tokens, ctas)),
                  kCols, 0, stream>>>(q, tokens, d, w_codes, w_scales, q_lat);
  FM_CHECK_CUDA(cudaGetLastError());
}

void mla_unabsorb_output(const bf16* o_lat, int64_t tokens, const MlaAbsorbDims& d,
                         const uint8_t* w_codes, const float* w_scales, bf16* attn,
                         cudaStream_t stream) {
  mla_absorb_check_dims("mla_unabsorb_output", d, tokens);
  if (tokens == 0) return;
  unabsorb_kernel<<<dim3(static_cast<unsigned>(d.heads), mla_absorb_token_slices(tokens, d.heads)),
                    kCols, 0, stream>>>(o_lat, tokens, d, w_codes, w_scales, attn);
  FM_CHECK_CUDA(cudaGetLastError());
}

void mla_cache_append(const bf16* latent, int64_t ld_latent, const bf16* k_pe, int64_t ld_k_pe,
                      int64_t batch, int64_t queries, int64_t latent_dim, int64_t rope_dim,
                      const int32_t* page_table, int64_t max_pages, int64_t page_tokens,
                      const int32_t* seq_lens, bf16* cache, cudaStream_t stream) {
  const char* who = "mla_cache_append";
  FM_CHECK_ARG(batch >= 0 && queries > 0, who, ": batch=", batch, ", queries=", queries);
  FM_CHECK_ARG(latent_dim % 8 == 0 && rope_dim % 8 == 0 && ld_latent % 8 == 0 && ld_k_pe % 8 == 0,
               who, ": latent_dim, rope_dim and the leading dimensions must be multiples of 8");
  FM_CHECK_ARG(page_tokens > 0 && max_pages > 0 && max_pages * page_tokens < (int64_t{1} << 31),
               who, ": page_tokens=", page_tokens, ", max_pages=", max_pages);
  if (batch == 0) return;
  for (const auto& [name, p] :
       {std::pair<const char*, const void*>{"latent", latent}, {"k_pe", k_pe}, {"cache", cache}})
    check_ptr(who, name, p);
  const int64_t total = batch * queries * ((latent_dim + rope_dim) / 8);
  append_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      latent, ld_latent, k_pe, ld_k_pe, batch * queries, static_cast<int>(queries),
      static_cast<int>(latent_dim), static_cast<int>(rope_dim), page_table,
      static_cast<int>(max_pages), static_cast<int>(page_tokens), seq_lens, cache);
  FM_CHECK_CUDA(cudaGetLastError());
}

}  // namespace fp8moe::kernels
