// DeepSeek-V3's MLA attention block on the GPU as one object, forward and backward: the CPU
// model's struct Mla (src/model/model.cpp) composed from the device-tested pieces:
//   q_a_proj (LinearFp8Gpu) -> q_a_layernorm (kernels::rmsnorm) -> q_b_proj     (q_lora_rank > 0;
//   else q_proj) | kv_a_proj_with_mqa -> [c_kv | k_pe] -> kv_a_layernorm on c_kv -> kv_b_proj
//   | RoPE on every head's q_pe and on k_pe (rope_apply_qk_gpu, one launch) | the attention core
//   (kernels::mla_attention_forward, causal per sequence) | o_proj (power-of-two activation
//   scales, as the CPU model's).
// Layer boundary: the input x is the already normed hidden state (the decoder layer's
// input_layernorm is outside, as in the CPU model's Mla); out is o_proj's output before the
// residual add. Activations are BF16 between ops; the CPU reference with the same rounding points
// is mla_block_reference(..., MlaReferenceMode::kGpu) (model/mla_block_reference.h, which lists
// them).
// Backward: dout -> dx (BF16; the two input branches' dx summed in FP32 and rounded once) and
// every parameter's FP32 gradient (the five projections' dW, the two norms' dw), accumulated or
// overwritten as `grad_output` says (kernels::WgradOutput). dk_pe (the attention's FP32 head sum)
// is rounded to BF16 once before the inverse RoPE.
// Weights: each projection's FP8 forms are a LinearWeightsDevice refreshed from its FP32 master
// (refresh(), once per optimizer step); the norms read their FP32 masters directly. The masters
// given to refresh() must stay valid (and unchanged between refreshes) while forward/backward run.
// Calls only enqueue work on the stream: no allocation, no host synchronisation (CUDA-graph
// capturable). Workspaces for up to max_tokens tokens are allocated at construction.
// Shapes: the attention kernel's head dims (dn 128, dr 64, dv 128); hidden, q_lora_rank,
// kv_lora_rank and heads * dv multiples of 128 (the FP8 GEMMs' reduction); checked at
// construction (kInvalidArgument).
// Test: test_model_gpu --gtest_filter='MlaBlockGpu*'.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/mla_decode.h"
#include "fp8moe/model/linear_gpu.h"
#include "fp8moe/model/mla_block_reference.h"
#include "fp8moe/model/model_kernels_gpu.h"

namespace fp8moe {

// Device pointers to the FP32 masters (shapes: MlaBlockParams); the unused q form null.
struct MlaBlockMastersGpu {
  const float *q_a = nullptr, *q_a_norm = nullptr, *q_b = nullptr, *q_proj = nullptr;
  const float *kv_a = nullptr, *kv_a_norm = nullptr, *kv_b = nullptr, *o = nullptr;
};
// Device pointers to the FP32 gradients (same shapes); the unused q form null.
struct MlaBlockGradsGpu {
  float *q_a = nullptr, *q_a_norm = nullptr, *q_b = nullptr, *q_proj = nullptr;
  float *kv_a = nullptr, *kv_a_norm = nullptr, *kv_b = nullptr, *o = nullptr;
};

// The block's saved activations and backward intermediates (device, valid after forward /
// backward until the next call; for tests that check each stage against the CPU pieces).
struct MlaBlockSavedGpu {
  const bf16 *cq, *cqn, *q, *kva, *ckvn, *kv, *kpe, *attn;  // forward (q, kva's k_pe: RoPE'd)
  const float *rstd_q, *rstd_kv, *lse;
  const bf16 *dattn, *dq, *dkv, *dkva, *dckvn, *dcqn, *dcq;  // backward (dq: inverse-RoPE'd)
  const float* dkpe;                                         // the attention's FP32 head sum
};

struct MlaBlockGpuOptions {
  // The five projections in BF16 (LinearBf16Gpu: cuBLASLt BF16 GEMMs) instead of FP8: the
  // bench's anchor (bench/gpu/mla_block_bench.cu), not the recipe; off by default. With it, x must
  // stay unchanged between forward and backward (LinearBf16Gpu keeps the pointer).
  bool bf16_projections = false;
};

// One layer's paged latent cache (kernels/mla_decode.h's layout: [pages, page_tokens,
// kv_lora_rank + dr] BF16) and the decoding sequences' page table and lengths (device; lengths
// count the step's new tokens, already placed by the caller).
struct MlaLatentCacheView {
  bf16* pages = nullptr;
  const int32_t* page_table = nullptr;  // [batch, max_pages]
  const int32_t* seq_lens = nullptr;    // [batch]
  int64_t page_tokens = 64, max_pages = 0;
};

class MlaProjection;  // one projection: FP8 (LinearWeightsDevice + LinearFp8Gpu) or BF16

class MlaBlockGpu {
 public:
  // rope: the device RoPE table (dim dr, the config's theta and scaling; owned by the caller,
  // shared by the layers, valid for the block's life). dims.scale is the softmax scale.
  MlaBlockGpu(const MlaBlockDims& dims, int64_t max_tokens, const RopeTableView& rope,
              MlaBlockGpuOptions options = {});
  ~MlaBlockGpu();
  MlaBlockGpu(const MlaBlockGpu&) = delete;
  MlaBlockGpu& operator=(const MlaBlockGpu&) = delete;

  // Requantises the projections' FP8 forms from the masters and keeps the pointers (the norms'
  // weights are read from them in forward / backward).
  void refresh(const MlaBlockMastersGpu& masters, cudaStream_t stream);

  // x [T, hidden] BF16 (T = batch * seq <= max_tokens, row t = b * seq + s), pos [T] device
  // int32 RoPE positions (kept: valid until backward) -> out [T, hidden] BF16. A position outside
  // the table: that token is not rotated and kStatusBadPosition is ORed into *status (device; may
  // be null).
  void forward(const bf16* x, const int32_t* pos, int64_t batch, int64_t seq, bf16* out,
               uint32_t* status, cudaStream_t stream);
  // For the last forward: dout [T, hidden] BF16 -> dx [T, hidden] BF16 (overwritten; may not
  // alias dout) and the gradients.
  void backward(const bf16* dout, bf16* dx, const MlaBlockGradsGpu& grads, uint32_t* status,
                cudaStream_t stream,
                kernels::WgradOutput grad_output = kernels::WgradOutput::kAccumulate);

  // Decoding in V3's inference form (the latent cache, kv_b folded into the query and the
  // output: kernels/mla_absorb.h, kernels/mla_decode.h). reserve_decode(max_tokens) allocates
  // the latent-form buffers once (outside any graph capture). forward_decode: x [batch *
  // queries, hidden] BF16, row b * queries + i = sequence b's new token i at position pos[row] =
  // cache.seq_lens[b] - queries + i; their latents are appended to the cache, every row attends
  // to its sequence's cached keys (causal among the new tokens) -> out [batch * queries, hidden].
  // No backward. plan / workspace: mla_decode_plan for (batch, queries, the cache's pages).
  // Needs the FP8 projections (not bf16_projections). tensor_core_products: kv_b's per-head
  // products on tensor cores (kernels::mla_absorb_query_tc / mla_unabsorb_output_tc: 1.2-3.1x
  // from 64 tokens a call, 0.7-0.9x at 1-8; not the CUDA-core forms' bits) instead of the
  // CUDA-core forms (the CPU reference's bits).
  void reserve_decode(int64_t max_tokens, bool tensor_core_products = false);
  void forward_decode(const bf16* x, const int32_t* pos, int64_t batch, int64_t queries,
                      const MlaLatentCacheView& cache, const kernels::MlaDecodePlan& plan,
                      void* workspace, bf16* out, uint32_t* status, cudaStream_t stream);
  kernels::MlaDecodeShape decode_shape(int64_t batch, int64_t queries,
                                       const MlaLatentCacheView& cache) const;

  const MlaBlockDims& dims() const { return d_; }
  int64_t max_tokens() const { return max_tokens_; }
  MlaBlockSavedGpu saved() const;

 private:
  void project(const bf16* x, int64_t tokens, cudaStream_t stream);

  MlaBlockDims d_;
  int64_t max_tokens_ = 0;
  RopeTableView rope_;
  MlaBlockMastersGpu masters_;
  bool refreshed_ = false;
  int64_t batch_ = 0, seq_ = 0;  // the last forward's (0: none yet)
  const int32_t* pos_ = nullptr;
  std::unique_ptr<MlaProjection> q_a_, q_b_, q_proj_, kv_a_, kv_b_, o_;
  void* buffer_ = nullptr;
  // Forward activations (kept for backward): cq [T, qr], cqn [T, qr], q [T, H*192] (RoPE'd),
  // kva [T, kvr+dr] (k_pe columns RoPE'd in place), ckvn [T, kvr], kv [T, H*256], kpe [T, 64],
  // attn [T, H*128]; rstd_q, rstd_kv [T], lse [H, T].
  bf16 *cq_ = nullptr, *cqn_ = nullptr, *q_ = nullptr, *kva_ = nullptr, *ckvn_ = nullptr,
       *kv_ = nullptr, *kpe_ = nullptr, *attn_ = nullptr;
  float *rstd_q_ = nullptr, *rstd_kv_ = nullptr, *lse_ = nullptr;
  // Backward: dattn [T, H*128], dq [T, H*192], dkv [T, H*256], dkpe FP32 [T, 64], dkva [T,
  // kvr+dr], dckvn [T, kvr], dcqn, dcq [T, qr], dx2 [T, hidden]; the attention's and the norms'
  // workspaces.
  bf16 *dattn_ = nullptr, *dq_ = nullptr, *dkv_ = nullptr, *dkva_ = nullptr, *dckvn_ = nullptr,
       *dcqn_ = nullptr, *dcq_ = nullptr, *dx2_ = nullptr;
  float *dkpe_ = nullptr, *norm_ws_ = nullptr;
  // Decoding (reserve_decode): q_lat [T, H, kvr+dr], o_lat [T, H, kvr], lse [T, H].
  void* decode_buffer_ = nullptr;
  int64_t decode_tokens_ = 0;
  bool tensor_core_products_ = false;
  bf16 *q_lat_ = nullptr, *o_lat_ = nullptr;
  float* decode_lse_ = nullptr;
  void* attn_ws_ = nullptr;
  size_t attn_ws_bytes_ = 0;
};

}  // namespace fp8moe
