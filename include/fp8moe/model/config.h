// The model's shape, read from a Hugging Face DeepSeek-V3 config.json (the same field names).
// Keys the file format carries but the model does not use are accepted and ignored (the list is
// kIgnoredConfigKeys); any other unknown key is an error naming it; missing keys take
// DeepSeek-V3's published values (ModelConfig's defaults below).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fp8moe/core/json.h"
#include "fp8moe/moe/router.h"

namespace fp8moe {

struct RopeScaling {
  std::string type;  // empty = none; "yarn" in DeepSeek-V3
  double factor = 1.0;
  double beta_fast = 32.0, beta_slow = 1.0, mscale = 1.0, mscale_all_dim = 0.0;
  int64_t original_max_position_embeddings = 4096;
};

struct ModelConfig {
  int64_t vocab_size = 129280;
  int64_t hidden_size = 7168;
  int64_t intermediate_size = 18432;     // dense FFN layers
  int64_t moe_intermediate_size = 2048;  // each routed and shared expert
  int64_t num_hidden_layers = 61;
  int64_t first_k_dense_replace = 3;  // layers [0, k) are dense, the rest MoE
  int64_t moe_layer_freq = 1;         // must be 1 (every layer after the dense ones is MoE)
  int64_t n_routed_experts = 256;
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 8;
  int64_t n_group = 8;
  int64_t topk_group = 4;
  double routed_scaling_factor = 2.5;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";
  std::string topk_method = "noaux_tc";
  // The complementary sequence-wise balance loss (weight alpha), applied when seq_aux is true.
  double aux_loss_alpha = 0.001;
  bool seq_aux = true;
  int64_t num_attention_heads = 128;
  int64_t num_key_value_heads = 128;  // MLA: equals num_attention_heads
  // 0 (null in the file, as DeepSeek-V2-Lite publishes it): no low-rank query path; the
  // queries are projected directly by self_attn.q_proj [heads * qk_head_dim, hidden].
  int64_t q_lora_rank = 1536;
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t num_nextn_predict_layers = 1;  // MTP depth
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 163840;
  RopeScaling rope_scaling{"yarn", 40.0, 32.0, 1.0, 1.0, 1.0, 4096};
  double initializer_range = 0.02;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  std::string hidden_act = "silu";
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace; }
  RouterConfig router_config() const;
  // Throws kInvalidArgument naming the inconsistent field(s).
  void validate() const;
  Json to_json() const;  // every field, HF names
};

// Keys accepted and ignored (training-framework or serving metadata of the HF file format).
extern const std::vector<std::string_view> kIgnoredConfigKeys;

// `what` names the source in messages (a path).
ModelConfig parse_model_config(const Json& json, const std::string& what);
ModelConfig load_model_config(const std::string& path);

// Parameter counts, by part, for `model info`.
struct ParameterPart {
  std::string name;
  int64_t total = 0;
  int64_t activated = 0;  // per token
};
struct ParameterReport {
  std::vector<ParameterPart> parts;            // main model parts, then "mtp" parts
  int64_t main_total = 0, main_activated = 0;  // without the MTP modules
  int64_t mtp_total = 0, mtp_activated = 0;    // MTP modules' own weights (embedding/head shared)
};
ParameterReport count_parameters(const ModelConfig& config);

}  // namespace fp8moe
