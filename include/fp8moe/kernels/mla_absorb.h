// The per-head products around MLA's latent decoding attention (kernels/mla_decode.h), and the
// cache append: what turns the training form's tensors into the latent form's and back.
//   absorb:   q_lat[t, h, j]       = sum_d q[t, h, d] W_UK[h][d, j]   (d < nope_dim, j < latent)
//             q_lat[t, h, latent + r] = q[t, h, nope_dim + r]          (q_pe, RoPE'd, copied)
//   unabsorb: attn[t, h, v]        = sum_j o_lat[t, h, j] W_UV[h][v, j]   (v < value_dim)
// W_UK[h] = rows [h (nope + value), h (nope + value) + nope) of kv_b_proj's weight [heads (nope +
// value), latent], W_UV[h] the next value_dim rows: the weight in its FP8 Fprop form (E4M3 codes
// row-major, FP32 scales [rows / 128][latent / 128] for 128x128 blocks: LinearWeightsDevice's
// view().w / .sw), dequantised on the fly, so the absorbed products multiply by exactly what the
// training form's kv_b GEMM multiplies by. FP32 accumulation in index order, BF16 out.
//   append:   cache row of token i of sequence b (position seq_lens[b] - queries + i, page
//             page_table[b * max_pages + pos / page_tokens], row pos % page_tokens) =
//             [latent[t, :latent_dim] | k_pe[t, :rope_dim]], t = b * queries + i (mla_decode's
//             layout).
// Tokens: T = batch * queries, row t = b * queries + i. Device pointers; stream-ordered,
// allocation-free, CUDA-graph capturable. Shapes: nope_dim and value_dim 128 (one scale block a
// head), latent_dim a multiple of 128 (thrown otherwise).
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstdint>

#include "fp8moe/core/dtypes.h"

namespace fp8moe::kernels {

struct MlaAbsorbDims {
  int64_t heads = 0, nope_dim = 128, rope_dim = 64, value_dim = 128, latent_dim = 512;
};

void mla_absorb_query(const bf16* q, int64_t tokens, const MlaAbsorbDims& dims,
                      const uint8_t* w_codes, const float* w_scales, bf16* q_lat,
                      cudaStream_t stream);
void mla_unabsorb_output(const bf16* o_lat, int64_t tokens, const MlaAbsorbDims& dims,
                         const uint8_t* w_codes, const float* w_scales, bf16* attn,
                         cudaStream_t stream);
// The same products on tensor cores (BF16 WMMA, FP32 accumulation): a 128-long block's sum of
// query (or latent output) times the E4M3 codes, then times the block's scale — the same values
// as above up to rounding (about one BF16 unit: the order of the sum and where the scale
// multiplies differ), not the same bits. Each output row depends on its own row only, so the
// results do not depend on the other tokens of the call. q / o_lat 16-byte aligned.
void mla_absorb_query_tc(const bf16* q, int64_t tokens, const MlaAbsorbDims& dims,
                         const uint8_t* w_codes, const float* w_scales, bf16* q_lat,
                         cudaStream_t stream);
void mla_unabsorb_output_tc(const bf16* o_lat, int64_t tokens, const MlaAbsorbDims& dims,
                            const uint8_t* w_codes, const float* w_scales, bf16* attn,
                            cudaStream_t stream);
void mla_cache_append(const bf16* latent, int64_t ld_latent, const bf16* k_pe, int64_t ld_k_pe,
                      int64_t batch, int64_t queries, int64_t latent_dim, int64_t rope_dim,
                      const int32_t* page_table, int64_t max_pages, int64_t page_tokens,
                      const int32_t* seq_lens, bf16* cache, cudaStream_t stream);

// CPU references (host pointers, same semantics and summation order).
void mla_absorb_query_reference(const bf16* q, int64_t tokens, const MlaAbsorbDims& dims,
                                const uint8_t* w_codes, const float* w_scales, bf16* q_lat);
void mla_unabsorb_output_reference(const bf16* o_lat, int64_t tokens, const MlaAbsorbDims& dims,
                                   const uint8_t* w_codes, const float* w_scales, bf16* attn);

}  // namespace fp8moe::kernels
