// One decoder layer of the DeepSeek-V3-architecture model on one GPU, forward and backward: the
// CPU Model's Block (src/model/model.cpp) with the FP8 recipe, composed from the device-tested
// pieces:
//   a  = input_layernorm(h)                     kernels::rmsnorm_forward
//   h1 = h + self_attn(a)                       MlaBlockGpu (model/mla_block_gpu.h), BF16 add
//   f  = post_attention_layernorm(h1)
//   h2 = h1 + mlp(f)                            dense SwiGLU (first_k_dense_replace layers) or
//                                               DeepSeekMoE: the router's FP32 logits (gate
//                                               GEMM), route_cuda with the selection bias, the
//                                               sequence-wise balance loss (seq_aux), MoeLayerGpu
//                                               (routed + shared experts) over a one-rank EP group
// The residual stream is BF16 (one rounding per add); everything else as the blocks' headers say.
// Parameters: FP32 masters and gradients found by the CPU model's names under `prefix` (e.g.
// "model.layers.3": ".input_layernorm.weight", ".self_attn.q_a_proj.weight", ...,
// ".mlp.gate.weight", ".mlp.gate.e_score_correction_bias" (a buffer), ".mlp.experts.<e>.gate_proj
// .weight", ...). refresh() requantises every FP8 weight form from its master (once per optimizer
// step, and after the masters are first written).
// Calls only enqueue work on the stream: no host synchronisation, no allocation (capturable in a
// CUDA graph). Workspaces for batch x seq tokens are allocated at construction.
// Shapes: what MlaBlockGpu and MoeLayerGpu take (head dims 128 / 64 / 128; hidden, q_lora_rank,
// kv_lora_rank, intermediate sizes multiples of 128); checked at construction (kInvalidArgument
// naming the field).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/moe_layer_gpu.h"
#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/model/config.h"
#include "fp8moe/model/mla_block_gpu.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/model/parameter_gpu.h"
#include "fp8moe/moe/expert_placement.h"

namespace fp8moe {

// The layer's saved activations and backward intermediates (device; valid after forward /
// backward until the next call; for tests that check each stage against the CPU pieces). MoE-only
// fields are null for dense layers.
struct DecoderLayerSavedGpu {
  int64_t tokens = 0;                                                     // T
  const bf16 *a = nullptr, *attn = nullptr, *h1 = nullptr, *f = nullptr;  // forward, [T, hidden]
  const float *rstd1 = nullptr, *rstd2 = nullptr;                         // [T]
  const bf16* mlp_out = nullptr;                     // the FFN's / MoE layer's output [T, hidden]
  const float *logits = nullptr, *scores = nullptr;  // MoE: FP32 [T, E]
  const int32_t* topk_idx = nullptr;                 // MoE: [T, K]
  const float* topk_w = nullptr;                     // MoE: [T, K]
  // Backward: the FFN's input gradient df (after the router's term), ln2's input gradient + dout
  // (dh1), MLA's input gradient (da); MoE: grad_topk_w [T, K] and dlogits [T, E] (route_backward
  // + the balance loss's gradient).
  const bf16 *df = nullptr, *dh1 = nullptr, *da = nullptr;
  const float *grad_topk_w = nullptr, *dlogits = nullptr;
  const bf16* moe_dx = nullptr;  // MoE: MoeLayerGpu's grad_x (df before the router's term)
};

// Expert parallelism: makes a MoE layer's EP endpoint for `cfg` (num_ranks > 1), connected to
// its peers (the same layer on the other ranks) before it returns. Every rank's layers call it in
// the same order. The endpoint's rank r holds the routed experts [r * E / R, (r + 1) * E / R).
using EpRankMaker = std::function<std::unique_ptr<comm::DeviceEpRank>(const comm::EpConfig& cfg)>;

class DecoderLayerGpu {
 public:
  // is_moe: config.is_moe_layer(layer index). rope: the shared device RoPE table (valid for the
  // layer's life). ep_ranks > 1 (MoE layers): make_ep makes the layer's endpoint and `params`
  // holds only this rank's routed experts (the shared expert, the router and the rest: all);
  // ep_ranks == 1: a one-rank EP group of the layer's own, every expert local.
  // grad_scratch (MoE layers; null: the layer allocates its own): grad_scratch_floats() FP32 the
  // experts' weight gradients pass through on their way into the parameters' gradients, during
  // backward only — so the MoE layers of a model share one.
  // placement (MoE layers; null or identity: none): redundant experts (moe/expert_placement.h):
  // the EP group runs over its physical slots, rank r holding slots [r * P / R, (r + 1) * P / R),
  // each a copy of its logical expert's weights (`params` must hold those experts); the router's
  // choices are mapped to slots by position (map_to_physical_cuda). For serving: backward()
  // throws, and no gradient scratch is used.
  DecoderLayerGpu(const ModelConfig& config, const std::string& prefix, bool is_moe, int64_t batch,
                  int64_t seq, const RopeTableView& rope, const ParameterLookup& params,
                  int ep_ranks = 1, const EpRankMaker& make_ep = {}, float* grad_scratch = nullptr,
                  const ExpertPlacement* placement = nullptr);
  // The size of a MoE layer's gradient scratch: every local routed expert's and the shared
  // expert's gate, up and down gradients (256-byte aligned parts).
  static int64_t grad_scratch_floats(const ModelConfig& config, int ep_ranks);
  ~DecoderLayerGpu();
  DecoderLayerGpu(const DecoderLayerGpu&) = delete;
  DecoderLayerGpu& operator=(const DecoderLayerGpu&) = delete;

  void refresh(cudaStream_t stream);

  // h [T, hidden] BF16, T = batch * seq (row t = b * seq + s), pos [T] device int32 (kept until
  // backward) -> out [T, hidden] BF16 (may not alias h; h must stay unchanged until backward).
  // balance_loss: device double the layer's sequence-wise balance loss (alpha included) is ADDED
  // to (MoE layers with seq_aux; untouched otherwise; may be null). Errors are ORed into *status
  // (model_kernels_gpu.h's and the router's bits; device, may be null).
  void forward(const bf16* h, const int32_t* pos, bf16* out, double* balance_loss, uint32_t* status,
               cudaStream_t stream);
  // Decoding (serving; no backward): h [batch * queries, hidden], each sequence's new tokens at
  // pos (MlaBlockGpu::forward_decode's contract), the attention over the layer's latent cache;
  // the FFN / MoE as forward's (the router's expert_load counted: serving-time load for EPLB;
  // no balance loss). batch * queries <= the constructor's batch * seq. reserve_decode first.
  void reserve_decode(int64_t max_tokens, bool tensor_core_products = false);
  // Decoding over the EP kernels' low-latency form (MoE layers; ModelGpu::reserve_low_latency_ep
  // wires it): the masked config of this layer's EP group for max_tokens a rank
  // (EpConfig::masked_capacity = ranks * max_tokens rounded up to 128, so no expert overflows;
  // max_tokens in [1, min(batch * seq, 1024)]), a masked comm::MoeLayerGpu over such an endpoint
  // holding this layer's weights, and the one this layer decodes through — which may serve every
  // MoE layer of the model in turn (MoeLayerGpu::set_weights before each forward), so that the
  // masked endpoint and its workspaces exist once, not once a layer. The MoeLayerGpu must outlive
  // the layer's decoding calls; its endpoint's rank and device must be the layer's.
  comm::EpConfig low_latency_ep_config(int64_t max_tokens) const;
  std::unique_ptr<comm::MoeLayerGpu> make_low_latency_moe(comm::DeviceEpRank& ep) const;
  void use_low_latency_moe(comm::MoeLayerGpu* moe);
  bool has_low_latency_ep() const;
  // low_latency_ep: the MoE exchange of this step over the low-latency endpoint
  // (use_low_latency_moe first; batch * queries <= its max_tokens). Collective: every rank's
  // layer must take the same path in the same step. The same bits either way (MoeLayerGpu).
  void forward_decode(const bf16* h, const int32_t* pos, int64_t batch, int64_t queries,
                      const MlaLatentCacheView& cache, const kernels::MlaDecodePlan& plan,
                      void* workspace, bf16* out, uint32_t* status, cudaStream_t stream,
                      bool low_latency_ep = false);
  const MlaBlockGpu& attention() const;

  // For the last forward: dout [T, hidden] BF16 -> dh [T, hidden] BF16 (overwritten; may not
  // alias dout), and every parameter's gradient of the layer accumulated or overwritten.
  void backward(const bf16* dout, bf16* dh, uint32_t* status, cudaStream_t stream,
                kernels::WgradOutput grad_output = kernels::WgradOutput::kAccumulate);

  bool is_moe() const { return is_moe_; }
  // MoE layers: tokens routed to each expert by the last forward, device int32
  // [n_routed_experts] (the CPU Moe's `load`); null for dense layers.
  int32_t* expert_load() const;
  // MoE layers: the same counts summed over every forward and decoding pass since construction
  // (or since the caller last zeroed it: device uint64 [n_routed_experts]) — serving-time load
  // for EPLB; null for dense layers.
  unsigned long long* expert_load_total() const;
  DecoderLayerSavedGpu saved() const;  // tests

 private:
  void ffn_forward(int64_t tokens, int64_t dense_rows, bool balance, double* balance_loss,
                   cudaStream_t stream, bool low_latency_ep = false);

  struct Impl;
  std::unique_ptr<Impl> impl_;
  bool is_moe_ = false;
};

}  // namespace fp8moe
