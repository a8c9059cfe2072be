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
#include <memory>
#include <vector>

#include "fp8moe/model/config.h"
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

class ModelGpu {
 public:
  // On the current device; parameters allocated (values unset: upload() them), workspaces for
  // [batch, window] token windows, window = seq + num_nextn_predict_layers + 1. Throws
  // kInvalidArgument naming what the GPU path cannot take (DecoderLayerGpu's shapes, MTP depth
  // > LossGpu::kMaxMtpDepth, seq > max_position_embeddings).
  ModelGpu(const ModelConfig& config, int64_t batch, int64_t seq);
  ~ModelGpu();
  ModelGpu(const ModelGpu&) = delete;
  ModelGpu& operator=(const ModelGpu&) = delete;

  const ModelConfig& config() const;
  int64_t batch() const;
  int64_t seq() const;
  int64_t window() const;

  std::vector<ParameterGpu>& parameters();
  std::vector<ParameterGpu>& buffers();  // the routers' selection biases
  int64_t parameter_count() const;

  // Values (not gradients) from / to a CPU model of the same config (synchronous; shapes
  // checked). upload() ends with refresh().
  void upload(Model& cpu);
  void download(Model& cpu, bool with_grads = false) const;
  // Requantises every FP8 weight form from its master: after each optimizer step.
  void refresh(cudaStream_t stream);

  // tokens: device int32 [batch, window] (the CPU Model's layout). With backward, every
  // ParameterGpu::grad is OVERWRITTEN with this batch's gradient (no zero_grad needed). *loss
  // written (device). Bad token ids / positions / routing set bits in status().
  void forward_backward(const int32_t* tokens, float mtp_weight, bool backward, LossGpu* loss,
                        cudaStream_t stream);

  // Per MoE block (main blocks, then the MTP modules', as Model::expert_load): device int32
  // [n_routed_experts], tokens routed to each expert by the last forward.
  int moe_blocks() const;
  const int32_t* expert_load(int block) const;
  // Device uint32: the ORed error bits of every call since construction (0: none).
  uint32_t* status() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fp8moe
