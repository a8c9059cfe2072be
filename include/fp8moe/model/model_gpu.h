// The DeepSeek-V3-architecture model (model/model.h) on one GPU, for training with the FP8
// recipe: the CPU Model's forward_backward composed from the device-tested pieces —
// embedding_forward_gpu, DecoderLayerGpu per layer, the final RMSNorm, the BF16 output head
// (LinearBf16Gpu), cross_entropy_gpu, and the multi-token-prediction modules (enorm / hnorm, the
// concatenation, eh_proj (LinearFp8Gpu), a DecoderLayerGpu, shared_head.norm, the shared head).
// Parameters and buffers: the CPU Model's, same order, names, shapes (ParameterGpu), so the
// optimizer (AdamWGpu), the checkpoint and the CPU reference read one table.
// The CPU Model (Precision::kFp8) is the reference; the GPU's differences are its BF16
// activations between ops and the FP8 requantisation of those roundings (docs/model/README.md).
// forward_backward only enqueues work on the stream: no host synchronisation, no allocation (a
// whole step is capturable in a CUDA graph).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "fp8moe/model/config.h"
#include "fp8moe/model/decoder_layer_gpu.h"
#include "fp8moe/model/model.h"
#include "fp8moe/model/parameter_gpu.h"

namespace fp8moe {

// One forward_backward's losses, written on the device (LossReport's fields).
struct LossGpu {
  static constexpr int kMaxMtpDepth = 4;
  double loss;  // main + mtp_weight * mean(mtp) + balance
  double main_loss;
  double balance_loss;  // every MoE block's sequence-wise balance loss (alpha included)
  double mtp_loss[kMaxMtpDepth];
};

// Expert parallelism over the ranks of a job (one process per GPU, train/trainer_gpu.h): rank r
// holds the routed experts [r * E / world, (r + 1) * E / world) of every MoE block, and every
// other tensor (embedding, attention, norms, routers, shared experts, dense FFNs, head) in full.
// Each rank runs forward_backward on its own tokens; the MoE blocks exchange them over EP.
struct ModelGpuParallel {
  int rank = 0;
  int world = 1;
  // The EP endpoint of MoE block `block` (main blocks, then the MTP modules'), connected to the
  // same block's endpoints on the other ranks; called in block order on every rank (world > 1).
  std::function<std::unique_ptr<comm::DeviceEpRank>(int block, const comm::EpConfig& cfg)>
      make_ep_rank;
  // Redundant experts for serving (moe/expert_placement.h; e.g. EPLB's plan): one placement per
  // MoE block (main blocks, then the MTP modules'), whose physical slots the block's EP group
  // runs over (rank r: slots [r * P / world, (r + 1) * P / world), the logical experts they copy
  // uploaded). Empty: none (rank r holds its E / world experts). With placements, world may be 1
  // (every expert local; the output is then the same bits) and forward_backward cannot run a
  // backward (thrown: replicas' gradients are not reduced).
  std::vector<ExpertPlacement> placements;
};

// A run of FP32 values or gradients in the model's arenas (device).
struct FloatSpan {
  float* data = nullptr;
  int64_t count = 0;
};

class ModelGpu {
 public:
  // On the current device; parameters allocated (values unset: upload() them), workspaces for
  // [batch, window] token windows, window = seq + num_nextn_predict_layers + 1. Throws
  // kInvalidArgument naming what the GPU path cannot take (DecoderLayerGpu's shapes, MTP depth
  // > LossGpu::kMaxMtpDepth, seq > max_position_embeddings, experts that do not split evenly
  // over par.world ranks).
  // rope_positions: the RoPE table's length (0: seq); serving needs the context's.
  ModelGpu(const ModelConfig& config, int64_t batch, int64_t seq, const ModelGpuParallel& par = {},
           int64_t rope_positions = 0);
  ~ModelGpu();
  ModelGpu(const ModelGpu&) = delete;
  ModelGpu& operator=(const ModelGpu&) = delete;

  const ModelConfig& config() const;
  int64_t batch() const;
  int64_t seq() const;
  int64_t window() const;

  // This rank's parameters in the CPU model's order (all of them with one rank; with several,
  // the routed experts of other ranks are left out: ParameterGpu::index keeps the full table's
  // index).
  std::vector<ParameterGpu>& parameters();
  std::vector<ParameterGpu>& buffers();  // the routers' selection biases
  int64_t parameter_count() const;

  // The gradients of the tensors every rank holds (ParameterGpu::sharded false), then those of
  // this rank's routed experts: two contiguous runs of the gradient arena (with the 64-float
  // padding between tensors, zero after every backward), so that a data-parallel job averages
  // the first with one all-reduce. The replicated run is padded to a multiple of 64 x world
  // floats, so that it splits into world equal, 256-byte aligned shares (a sharded optimizer's).
  FloatSpan replicated_grads() const;
  FloatSpan sharded_grads() const;
  // The replicated tensors' values: the value arena's run at the same offsets.
  FloatSpan replicated_values() const;
  const ModelGpuParallel& parallel() const;
  // The replicated gradients outside every decoder block (embedding, final norm, head, the MTP
  // modules' norms and eh_proj): the runs of replicated_grads() no grad-ready call names.
  std::vector<FloatSpan> replicated_rest() const;
  // Called while backward is enqueued, once per decoder block (the MTP modules' first, then the
  // main layers last to first), right after the block's backward, with its replicated gradients
  // (the run its own tensors fill; the rest of the backward no longer writes it): a data-parallel
  // trainer reduces them on a second stream, overlapped with the backward of the blocks below.
  // Not set: nothing is called.
  void set_grad_ready(std::function<void(FloatSpan grads, cudaStream_t stream)> hook);

  // Values (not gradients) from / to a CPU model of the same config (synchronous; shapes
  // checked). upload() takes this rank's share (with several ranks: the replicated tensors and its
  // own routed experts) and ends with refresh(); download() is for one rank only.
  void upload(Model& cpu);
  void download(Model& cpu, bool with_grads = false) const;
  // Requantises every FP8 weight form from its master: after each optimizer step.
  void refresh(cudaStream_t stream);

  // tokens: device int32 [batch, window] (the CPU Model's layout). With backward, every
  // ParameterGpu::grad is OVERWRITTEN with this batch's gradient (no zero_grad needed). *loss
  // written (device). Bad token ids / positions / routing set bits in status().
  void forward_backward(const int32_t* tokens, float mtp_weight, bool backward, LossGpu* loss,
                        cudaStream_t stream);

  // Serving (serve/generator_gpu.h builds on it): one decoding step of the main model over
  // the layers' paged latent caches (MlaBlockGpu::forward_decode). reserve_decode(max_tokens)
  // once, outside any graph capture (max_tokens <= batch * seq). ids / pos [batch * queries]
  // device int32: row b * queries + i is sequence b's new token i and its position
  // (seq_lens[b] - queries + i); caches[l] is main layer l's cache (the same page table and
  // lengths for every layer). logits [batch, vocab] BF16: after each sequence's last new token.
  // The MTP modules do not run. Enqueues only: capturable in a CUDA graph.
  // tensor_core_products: MlaBlockGpu::reserve_decode's (the attention's per-head products).
  void reserve_decode(int64_t max_tokens, bool tensor_core_products = false);
  // Every MoE layer's (the MTP modules' too) decoding exchange over the EP kernels' low-latency
  // form as well: ONE masked endpoint and comm::MoeLayerGpu (its workspaces) for all the MoE
  // layers of an expert-slot count (one, unless redundant-expert placements differ in size),
  // each layer setting its weights before its forward (DecoderLayerGpu::use_low_latency_moe);
  // with several ranks the endpoints come from ModelGpuParallel::make_ep_rank, numbered after the
  // layers' blocks. Collective, outside any graph capture; max_tokens (a rank's rows in one
  // decoding step) in [1, min(batch * seq, 1024)]. Then decode / decode_mtp take low_latency_ep.
  void reserve_low_latency_ep(int64_t max_tokens);
  bool has_low_latency_ep() const;
  // head_rows (>= batch; 0: batch): rows the output head computes (logits' rows past batch are
  // of stale states), so that its GEMM's shape, hence its summation order, need not follow the
  // batch (batch-invariant decoding).
  // every_row: logits [batch * queries, vocab] of every new row (row b * queries + i), e.g. to
  // verify a draft; head_rows then counts rows of that (>= batch * queries).
  void decode(const int32_t* ids, const int32_t* pos, int64_t batch, int64_t queries,
              const std::vector<MlaLatentCacheView>& caches, const kernels::MlaDecodePlan& plan,
              void* workspace, bf16* logits, cudaStream_t stream, int64_t head_rows = 0,
              bool every_row = false, bool low_latency_ep = false);
  // The last decode's final-layer states [batch * queries, hidden] (before the final norm): what
  // the MTP module reads. Valid until the next decode.
  const bf16* decode_hidden() const;
  // Multi-token prediction module `depth` (0-based) as a draft model (V3's speculative decoding):
  // for row b * queries + i, h_prev [rows, hidden] the main model's final-layer state at position
  // pos[row] (decode_hidden()), ids[row] the token at pos[row] + 1; the module's decoder layer
  // attends over its own latent cache `cache` (its positions: the main model's). logits [rows,
  // vocab] of every row: the token at pos[row] + 2. reserve_decode covers the modules' layers.
  void decode_mtp(int depth, const bf16* h_prev, const int32_t* ids, const int32_t* pos,
                  int64_t batch, int64_t queries, const MlaLatentCacheView& cache,
                  const kernels::MlaDecodePlan& plan, void* workspace, bf16* logits,
                  cudaStream_t stream, int64_t head_rows = 0, bool low_latency_ep = false);
  int mtp_depth() const;
  // The attention block of main layer l (its decode_shape, dims).
  const MlaBlockGpu& attention(int64_t layer) const;

  // Per MoE block (main blocks, then the MTP modules', as Model::expert_load): device int32
  // [n_routed_experts], tokens routed to each expert by the last forward.
  int moe_blocks() const;
  // (Mutable: a data-parallel trainer sums it over its ranks in place.)
  int32_t* expert_load(int block) const;
  // Serving-time load: the same counts summed over every pass since construction or the last
  // reset (forward_backward, decode, decode_mtp; logical experts), [moe_blocks() x
  // n_routed_experts] (synchronous copy) — an EPLB input row per block (`fp8moe eplb`).
  std::vector<int64_t> expert_load_totals() const;
  void reset_expert_load_totals(cudaStream_t stream);
  // Device uint32: the ORed error bits of every call since construction (0: none).
  uint32_t* status() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fp8moe
