// MLA's decoding attention in V3's inference form (the kv_b projection folded into the query and
// the output, "weight absorption"): every head attends to one shared latent cache, i.e.
// multi-query attention in latent space.
//   cache  [num_pages, page_tokens, latent_dim + rope_dim] BF16: per token the normalised latent
//          c = kv_a_layernorm(kv_a_proj(x)[:latent_dim]) then the decoupled key k_pe, rotated at
//          the token's position (latent_dim + rope_dim = 576 floats for V3: 57x less than the
//          expanded per-head keys and values of model.h's KvCache).
//   page_table [batch, max_pages] int32: sequence b's token t lives in page
//          page_table[b * max_pages + t / page_tokens], row t % page_tokens (a paged cache as
//          serving engines keep it; entries past a sequence's pages are never read).
//   seq_lens [batch] int32: keys of sequence b, the `queries` new tokens included (their latents
//          are in the cache already); device memory, so a decode step captures in a CUDA graph.
//   q      [batch, queries, heads, latent_dim + rope_dim]: per head q_nope folded through the key
//          half of kv_b (q_lat = W_UK[h]^T q_nope[h], latent_dim) then q_pe rotated at its
//          position.
//   out    [batch, queries, heads, latent_dim]: softmax(scores) . c (the caller applies W_UV[h] and
//          o_proj), lse [batch, queries, heads] the natural-log normaliser max + log(sum exp).
// score(h, t) = softmax_scale * (q_lat . c_t + q_pe . k_pe_t). Query i (0-based) of sequence b is
// the token at position seq_lens[b] - queries + i and sees keys [0, seq_lens[b] - queries + i]
// (queries > 1: speculative or multi-token-prediction decoding, causal among the new tokens).
// A row that sees no key (seq_lens[b] < queries) gets out 0 and lse -inf.
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstddef>
#include <cstdint>

#include "fp8moe/core/dtypes.h"

namespace fp8moe::kernels {

struct MlaDecodeShape {
  int64_t batch = 0;    // sequences
  int64_t queries = 1;  // new tokens a sequence this step
  int64_t heads = 0;
  int64_t latent_dim = 512;  // kv_lora_rank
  int64_t rope_dim = 64;     // qk_rope_head_dim
  int64_t page_tokens = 64;
  int64_t max_pages =
      0;  // page_table's row length: the longest sequence is max_pages * page_tokens
  float softmax_scale = 0;

  int64_t key_dim() const { return latent_dim + rope_dim; }
  int64_t rows() const { return queries * heads; }  // query rows a sequence
};

// Checks a shape for the reference (positive sizes; thrown as invalid_argument-kind Error).
void mla_decode_check_shape(const char* who, const MlaDecodeShape& shape);

// CPU reference (host pointers; FP32 on the inputs; the cache rows of sequence b's keys only are
// read). Tested by tests/kernels/mla_decode_test.cpp against a dense computation, and as the
// model's latent KV cache (model.h) against its expanded attention (tests/model/
// kv_cache_latent_test.cpp).
void mla_decode_reference(const MlaDecodeShape& shape, const float* q, const float* cache,
                          const int32_t* page_table, const int32_t* seq_lens, float* out,
                          float* lse);

// The GPU form: FlashDecoding over the pages (each sequence's keys split into `splits` ranges run
// by separate CTAs, merged by their lse), 64 query rows a CTA, two warpgroups sharing one key tile
// of 64 tokens (each computes the scores of 32 keys and half of the output columns on BF16
// tensor cores: wgmma, FP32 accumulation, P rounded to BF16 before P . c). Supported on sm_90a:
// latent_dim 256 or 512, rope_dim 64, page_tokens a multiple of 64 (others are thrown).
// Plan once per (shape, longest sequence) on the host; run() is allocation-free, stream-ordered
// and CUDA-graph capturable (the sequence lengths are read on the device).
struct MlaDecodePlan {
  int64_t splits = 1;          // key ranges a sequence (the grid's)
  size_t workspace_bytes = 0;  // FP32 partial outputs and lse when splits > 1
  // 0: a sequence's keys are cut into `splits` equal ranges (whole 64-key tiles). > 0: cut at
  // multiples of split_tokens whatever the batch (the ranges past a sequence's end are empty), so
  // a sequence's output is the same bits in any batch: batch-invariant decoding.
  int64_t split_tokens = 0;
};
MlaDecodePlan mla_decode_plan(const MlaDecodeShape& shape, int64_t sm_count);
// The batch-invariant plan: split_tokens a multiple of 64; splits = the longest sequence's ranges.
MlaDecodePlan mla_decode_plan_fixed(const MlaDecodeShape& shape, int64_t split_tokens);
// The workspace a forced split count needs (tests and benchmarks set MlaDecodePlan by hand).
size_t mla_decode_workspace_bytes(const MlaDecodeShape& shape, int64_t splits);

void mla_decode(const MlaDecodeShape& shape, const MlaDecodePlan& plan, const bf16* q,
                const bf16* cache, const int32_t* page_table, const int32_t* seq_lens, bf16* out,
                float* lse, void* workspace, cudaStream_t stream);

// The benchmarks' anchor: one CTA per (sequence, query row), FP32 CUDA cores, no tensor cores and
// no splitting (what a first port of the reference would be). Same contract as mla_decode.
void mla_decode_naive(const MlaDecodeShape& shape, const bf16* q, const bf16* cache,
                      const int32_t* page_table, const int32_t* seq_lens, bf16* out, float* lse,
                      cudaStream_t stream);

}  // namespace fp8moe::kernels
