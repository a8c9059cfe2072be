// DeepSeek-V3's MoE gate (scoring_func "sigmoid", topk_method "noaux_tc"), CPU reference.
//   s = sigmoid(logits)                               affinities, [T, E]
//   selection uses s + bias (bias: the auxiliary-loss-free balancing bias; selection only)
//   group score = sum of the two largest biased scores in the group; keep the topk_group best
//   groups; choose the top-k biased scores among the kept groups' experts
//   weight_i = s_i / sum of chosen s (when norm_topk_prob) * routed_scaling_factor
// Node-limited routing is the same mechanism with groups = nodes (topk_group = M nodes).
// Ties (equal values) go to the lower group / expert index, both when choosing groups and when
// choosing experts. Groups that are not kept cannot be chosen at all (as in vLLM/SGLang, which
// mask with -inf; Hugging Face's reference masks with 0.0, which differs only when biased
// scores are negative). The weight sum runs over the chosen experts in ascending id order and
// has no epsilon (sigmoid scores are > 0). Normalisation applies whenever norm_topk_prob is
// set, K = 1 included (Hugging Face skips it for K = 1).
// sigmoid is evaluated in double and rounded to float once, on CPU and GPU alike, so both
// select identically. NaN logits are rejected (kInvalidArgument); +-inf are fine.
#pragma once

#include <cstdint>
#include <vector>

namespace fp8moe {

struct RouterConfig {
  int n_routed_experts = 256;
  int num_experts_per_tok = 8;
  int n_group = 8;
  int topk_group = 4;
  float routed_scaling_factor = 2.5f;
  bool norm_topk_prob = true;
};

// Throws kInvalidArgument naming the inconsistency (E % G, TG > G, K > experts in kept groups...).
void validate_router_config(const RouterConfig& config);

struct RouterOutput {
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<int32_t> topk_idx;   // [T, K], expert ids in ascending order per token
  std::vector<float> topk_weight;  // [T, K], gate weights in the same order
  std::vector<float> scores;       // [T, E], sigmoid affinities (kept for backward)
};

// The score function: float(1 / (1 + exp(-double(x)))).
float router_sigmoid(float x);

// logits [T, E] row-major; bias [E] (nullptr = zeros).
RouterOutput route(const RouterConfig& config, const float* logits, int64_t tokens,
                   const float* bias);

// Gradient of the gate weights w.r.t. the logits. grad_weight [T, K] (same order as topk_idx)
// -> grad_logits [T, E] (overwritten). Selection is piecewise constant: only chosen experts
// receive gradient, through the sigmoid and the normalisation.
void route_backward(const RouterConfig& config, const RouterOutput& forward,
                    const float* grad_weight, float* grad_logits);

}  // namespace fp8moe
