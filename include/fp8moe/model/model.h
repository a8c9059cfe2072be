// The DeepSeek-V3-architecture model on the CPU: embedding, decoder blocks (RMSNorm, MLA
// attention with decoupled RoPE, dense SwiGLU FFN for the first `first_k_dense_replace` layers,
// DeepSeekMoE after: shared experts + routed experts chosen by the router of moe/router.h),
// final RMSNorm, output head, and `num_nextn_predict_layers` multi-token-prediction modules
// that share the embedding and the head. Forward and backward for every part.
//
// Precision (linear.h): every linear layer of the blocks and of the MTP projections runs in the
// chosen precision; the embedding, the attention core, norms and gates run in FP32; the output
// head in BF16 for bf16/fp8 (FP32 for fp32). Parameter names follow the Hugging Face checkpoint.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/model/config.h"
#include "fp8moe/model/linear.h"

namespace fp8moe {

struct Parameter {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> value;
  std::vector<float> grad;   // same size as value (empty for buffers)
  bool weight_decay = true;  // false for norms
  int64_t numel() const { return static_cast<int64_t>(value.size()); }
};

struct LossReport {
  double loss = 0;  // main + mtp_weight * mean(mtp) + balance
  double main_loss = 0;
  std::vector<double> mtp_loss;  // one per MTP depth
  double balance_loss = 0;       // sequence-wise balance losses of all MoE blocks (seq_aux)
};

struct ModelImpl;

class Model {
 public:
  // Weights initialised from `seed` (normal(0, initializer_range), norms 1, router biases 0).
  Model(const ModelConfig& config, uint64_t seed);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  std::deque<Parameter>& parameters();
  // Non-trained state: the router's selection bias of each MoE block
  // ("...mlp.gate.e_score_correction_bias").
  std::deque<Parameter>& buffers();
  int64_t parameter_count() const;

  // tokens: [batch, window] row-major, window = seq + num_nextn_predict_layers + 1. The main
  // model reads positions [0, seq) and predicts [1, seq]; MTP depth k predicts [k+1, seq+k].
  // With backward, gradients are ADDED to Parameter::grad.
  LossReport forward_backward(const int32_t* tokens, int64_t batch, int64_t window,
                              Precision precision, float mtp_weight, bool backward);

  // Tokens routed to each expert by the last forward, per MoE block (main blocks, then MTP).
  const std::vector<std::vector<int64_t>>& expert_load() const;

  // Logits [vocab] of the token after tokens[0, seq) (main model only).
  std::vector<float> next_token_logits(const int32_t* tokens, int64_t seq, Precision precision);

  void zero_grad();

 private:
  std::unique_ptr<ModelImpl> impl_;
};

}  // namespace fp8moe
