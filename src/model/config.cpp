#include "fp8moe/model/config.h"

#include <algorithm>

namespace fp8moe {

const std::vector<std::string_view> kIgnoredConfigKeys = {
    "_name_or_path", "architectures",        "attention_dropout", "auto_map",
    "ep_size",       "model_type",           "pretraining_tp",    "quantization_config",
    "torch_dtype",   "transformers_version", "use_cache",
};

namespace {

template <typename T>
void read_field(const Json& json, const char* key, T& field, const std::string& what) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return;  // missing: DeepSeek-V3's value stays
  const bool ok = std::is_same_v<T, bool>          ? it->is_boolean()
                  : std::is_same_v<T, std::string> ? it->is_string()
                  : std::is_integral_v<T>          ? it->is_number_integer()
                                                   : it->is_number();
  if (!ok)
    FM_THROW(ErrorKind::kInvalidArgument, what, ": key '", key, "' has the wrong type (",
             it->type_name(), ")");
  field = it->template get<T>();
}

RopeScaling parse_rope_scaling(const Json& j, const std::string& what) {
  const std::string ctx = what + ": rope_scaling";
  check_known_keys(j,
                   {"type", "rope_type", "factor", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "original_max_position_embeddings"},
                   ctx);
  RopeScaling r;
  r.type = j.contains("type") ? json_get<std::string>(j, "type", ctx)
                              : json_get_or<std::string>(j, "rope_type", "", ctx);
  r.factor = json_get_or<double>(j, "factor", 1.0, ctx);
  r.beta_fast = json_get_or<double>(j, "beta_fast", 32.0, ctx);
  r.beta_slow = json_get_or<double>(j, "beta_slow", 1.0, ctx);
  r.mscale = json_get_or<double>(j, "mscale", 1.0, ctx);
  r.mscale_all_dim = json_get_or<double>(j, "mscale_all_dim", 0.0, ctx);
  r.original_max_position_embeddings =
      json_get_or<int64_t>(j, "original_max_position_embeddings", 4096, ctx);
  FM_CHECK_ARG(r.type == "yarn", ctx, ": only type \"yarn\" is supported (got \"", r.type, "\")");
  return r;
}

}  // namespace

RouterConfig ModelConfig::router_config() const {
  RouterConfig r;
  r.n_routed_experts = static_cast<int>(n_routed_experts);
  r.num_experts_per_tok = static_cast<int>(num_experts_per_tok);
  r.n_group = static_cast<int>(n_group);
  r.topk_group = static_cast<int>(topk_group);
  r.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  r.norm_topk_prob = norm_topk_prob;
  return r;
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* name) {
    FM_CHECK_ARG(v > 0, "model config: ", name, " must be positive (got ", v, ")");
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  FM_CHECK_ARG(q_lora_rank >= 0, "model config: q_lora_rank must be >= 0 (0 or null: queries ",
               "projected directly by q_proj; got ", q_lora_rank, ")");
  positive(qk_nope_head_dim, "qk_nope_head_dim");
  positive(v_head_dim, "v_head_dim");
  FM_CHECK_ARG(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0,
               "model config: qk_rope_head_dim must be positive and even (got ", qk_rope_head_dim,
               ")");
  FM_CHECK_ARG(first_k_dense_replace >= 0 && first_k_dense_replace <= num_hidden_layers,
               "model config: first_k_dense_replace=", first_k_dense_replace,
               " must lie in [0, num_hidden_layers=", num_hidden_layers, "]");
  if (first_k_dense_replace > 0) positive(intermediate_size, "intermediate_size");
  FM_CHECK_ARG(num_nextn_predict_layers >= 0,
               "model config: num_nextn_predict_layers must be >= 0");
  FM_CHECK_ARG(moe_layer_freq == 1, "model config: moe_layer_freq must be 1 (got ", moe_layer_freq,
               ")");
  FM_CHECK_ARG(num_key_value_heads == num_attention_heads,
               "model config: MLA needs num_key_value_heads == num_attention_heads (got ",
               num_key_value_heads, " and ", num_attention_heads, ")");
  FM_CHECK_ARG(hidden_act == "silu", "model config: hidden_act must be \"silu\" (got \"",
               hidden_act, "\")");
  FM_CHECK_ARG(scoring_func == "sigmoid", "model config: scoring_func must be \"sigmoid\" (got \"",
               scoring_func, "\")");
  FM_CHECK_ARG(topk_method == "noaux_tc", "model config: topk_method must be \"noaux_tc\" (got \"",
               topk_method, "\")");
  FM_CHECK_ARG(aux_loss_alpha >= 0, "model config: aux_loss_alpha must be >= 0 (got ",
               aux_loss_alpha, ")");
  FM_CHECK_ARG(!attention_bias, "model config: attention_bias must be false");
  FM_CHECK_ARG(!tie_word_embeddings, "model config: tie_word_embeddings must be false");
  FM_CHECK_ARG(rms_norm_eps > 0, "model config: rms_norm_eps must be positive");
  if (first_k_dense_replace < num_hidden_layers || num_nextn_predict_layers > 0) {
    positive(moe_intermediate_size, "moe_intermediate_size");
    FM_CHECK_ARG(n_shared_experts >= 0, "model config: n_shared_experts must be >= 0");
    try {
      validate_router_config(router_config());
    } catch (const Error& e) {
      FM_THROW(ErrorKind::kInvalidArgument, "model config: ", e.message());
    }
  }
}

Json ModelConfig::to_json() const {
  Json j = {
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"first_k_dense_replace", first_k_dense_replace},
      {"moe_layer_freq", moe_layer_freq},
      {"n_routed_experts", n_routed_experts},
      {"n_shared_experts", n_shared_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"n_group", n_group},
      {"topk_group", topk_group},
      {"routed_scaling_factor", routed_scaling_factor},
      {"norm_topk_prob", norm_topk_prob},
      {"scoring_func", scoring_func},
      {"topk_method", topk_method},
      {"aux_loss_alpha", aux_loss_alpha},
      {"seq_aux", seq_aux},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"q_lora_rank", q_lora_rank > 0 ? Json(q_lora_rank) : Json(nullptr)},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"v_head_dim", v_head_dim},
      {"num_nextn_predict_layers", num_nextn_predict_layers},
      {"rope_theta", rope_theta},
      {"rms_norm_eps", rms_norm_eps},
      {"max_position_embeddings", max_position_embeddings},
      {"initializer_range", initializer_range},
      {"tie_word_embeddings", tie_word_embeddings},
      {"attention_bias", attention_bias},
      {"hidden_act", hidden_act},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_id},
  };
  if (rope_scaling.type.empty()) {
    j["rope_scaling"] = nullptr;
  } else {
    j["rope_scaling"] = {
        {"type", rope_scaling.type},
        {"factor", rope_scaling.factor},
        {"beta_fast", rope_scaling.beta_fast},
        {"beta_slow", rope_scaling.beta_slow},
        {"mscale", rope_scaling.mscale},
        {"mscale_all_dim", rope_scaling.mscale_all_dim},
        {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  }
  return j;
}

ModelConfig parse_model_config(const Json& json, const std::string& what) {
  FM_CHECK_ARG(json.is_object(), what, ": a model config must be a JSON object");
  static const std::vector<std::string_view> known = {"vocab_size",
                                                      "hidden_size",
                                                      "intermediate_size",
                                                      "moe_intermediate_size",
                                                      "num_hidden_layers",
                                                      "first_k_dense_replace",
                                                      "moe_layer_freq",
                                                      "n_routed_experts",
                                                      "n_shared_experts",
                                                      "num_experts_per_tok",
                                                      "n_group",
                                                      "topk_group",
                                                      "routed_scaling_factor",
                                                      "norm_topk_prob",
                                                      "scoring_func",
                                                      "topk_method",
                                                      "aux_loss_alpha",
                                                      "seq_aux",
                                                      "num_attention_heads",
                                                      "num_key_value_heads",
                                                      "q_lora_rank",
                                                      "kv_lora_rank",
                                                      "qk_nope_head_dim",
                                                      "qk_rope_head_dim",
                                                      "v_head_dim",
                                                      "num_nextn_predict_layers",
                                                      "rope_theta",
                                                      "rms_norm_eps",
                                                      "max_position_embeddings",
                                                      "rope_scaling",
                                                      "initializer_range",
                                                      "tie_word_embeddings",
                                                      "attention_bias",
                                                      "hidden_act",
                                                      "bos_token_id",
                                                      "eos_token_id"};
  for (const auto& [key, value] : json.items()) {
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    if (std::find(kIgnoredConfigKeys.begin(), kIgnoredConfigKeys.end(), key) !=
        kIgnoredConfigKeys.end())
      continue;
    FM_THROW(ErrorKind::kInvalidArgument, what, ": unknown key '", key,
             "' (not a DeepSeek-V3 config field; see docs/model/README.md)");
  }
  ModelConfig c;
  read_field(json, "vocab_size", c.vocab_size, what);
  read_field(json, "hidden_size", c.hidden_size, what);
  read_field(json, "intermediate_size", c.intermediate_size, what);
  read_field(json, "moe_intermediate_size", c.moe_intermediate_size, what);
  read_field(json, "num_hidden_layers", c.num_hidden_layers, what);
  read_field(json, "first_k_dense_replace", c.first_k_dense_replace, what);
  read_field(json, "moe_layer_freq", c.moe_layer_freq, what);
  read_field(json, "n_routed_experts", c.n_routed_experts, what);
  read_field(json, "n_shared_experts", c.n_shared_experts, what);
  read_field(json, "num_experts_per_tok", c.num_experts_per_tok, what);
  read_field(json, "n_group", c.n_group, what);
  read_field(json, "topk_group", c.topk_group, what);
  read_field(json, "routed_scaling_factor", c.routed_scaling_factor, what);
  read_field(json, "norm_topk_prob", c.norm_topk_prob, what);
  read_field(json, "scoring_func", c.scoring_func, what);
  read_field(json, "topk_method", c.topk_method, what);
  read_field(json, "aux_loss_alpha", c.aux_loss_alpha, what);
  read_field(json, "seq_aux", c.seq_aux, what);
  read_field(json, "num_attention_heads", c.num_attention_heads, what);
  c.num_key_value_heads = c.num_attention_heads;
  read_field(json, "num_key_value_heads", c.num_key_value_heads, what);
  // NOTE: unlike other keys, null is a value here: Hugging Face's "no low-rank query path".
  if (json.contains("q_lora_rank") && json.at("q_lora_rank").is_null()) c.q_lora_rank = 0;
  read_field(json, "q_lora_rank", c.q_lora_rank, what);
  read_field(json, "kv_lora_rank", c.kv_lora_rank, what);
  read_field(json, "qk_nope_head_dim", c.qk_nope_head_dim, what);
  read_field(json, "qk_rope_head_dim", c.qk_rope_head_dim, what);
  read_field(json, "v_head_dim", c.v_head_dim, what);
  read_field(json, "num_nextn_predict_layers", c.num_nextn_predict_layers, what);
  read_field(json, "rope_theta", c.rope_theta, what);
  read_field(json, "rms_norm_eps", c.rms_norm_eps, what);
  read_field(json, "max_position_embeddings", c.max_position_embeddings, what);
  read_field(json, "initializer_range", c.initializer_range, what);
  read_field(json, "tie_word_embeddings", c.tie_word_embeddings, what);
  read_field(json, "attention_bias", c.attention_bias, what);
  read_field(json, "hidden_act", c.hidden_act, what);
  read_field(json, "bos_token_id", c.bos_token_id, what);
  read_field(json, "eos_token_id", c.eos_token_id, what);
  if (json.contains("rope_scaling")) {
    const Json& rs = json.at("rope_scaling");
    c.rope_scaling = rs.is_null() ? RopeScaling{} : parse_rope_scaling(rs, what);
  }
  try {
    c.validate();
  } catch (const Error& e) {
    FM_THROW(ErrorKind::kInvalidArgument, what, ": ", e.message());
  }
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  return parse_model_config(read_json_file(path), "'" + path + "'");
}

// Counts follow the module list of model.h; RMSNorm weights are counted with their part.
ParameterReport count_parameters(const ModelConfig& c) {
  const int64_t h = c.hidden_size, heads = c.num_attention_heads;
  const int64_t q_proj = c.q_lora_rank > 0 ? h * c.q_lora_rank + c.q_lora_rank +
                                                 c.q_lora_rank * heads * c.qk_head_dim()
                                           : h * heads * c.qk_head_dim();
  const int64_t attn = q_proj + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank +
                       c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) +
                       heads * c.v_head_dim * h;
  const int64_t layer_norms = 2 * h;
  const int64_t dense_ffn = 3 * h * c.intermediate_size;
  const int64_t expert = 3 * h * c.moe_intermediate_size;
  const int64_t gate = c.n_routed_experts * h;  // the selection bias is a buffer, not counted
  const int64_t n_dense = c.first_k_dense_replace;
  const int64_t n_moe = c.num_hidden_layers - n_dense;

  ParameterReport r;
  auto add = [&](const std::string& name, int64_t total, int64_t activated, bool mtp) {
    r.parts.push_back({name, total, activated});
    (mtp ? r.mtp_total : r.main_total) += total;
    (mtp ? r.mtp_activated : r.main_activated) += activated;
  };
  const int64_t emb = c.vocab_size * h;
  add("embedding", emb, emb, false);
  add("attention (MLA)", c.num_hidden_layers * attn, c.num_hidden_layers * attn, false);
  add("norms", c.num_hidden_layers * layer_norms + h, c.num_hidden_layers * layer_norms + h, false);
  add("dense FFN", n_dense * dense_ffn, n_dense * dense_ffn, false);
  add("shared experts", n_moe * c.n_shared_experts * expert, n_moe * c.n_shared_experts * expert,
      false);
  add("routed experts", n_moe * c.n_routed_experts * expert, n_moe * c.num_experts_per_tok * expert,
      false);
  add("gates", n_moe * gate, n_moe * gate, false);
  add("output head", emb, emb, false);
  if (c.num_nextn_predict_layers > 0) {
    const int64_t d = c.num_nextn_predict_layers;
    const bool moe_block = c.num_hidden_layers + 0 >= c.first_k_dense_replace;
    const int64_t ffn_total =
        moe_block ? (c.n_shared_experts + c.n_routed_experts) * expert + gate : dense_ffn;
    const int64_t ffn_active =
        moe_block ? (c.n_shared_experts + c.num_experts_per_tok) * expert + gate : dense_ffn;
    const int64_t own = 2 * h * h + 3 * h + layer_norms + attn;  // eh_proj, enorm/hnorm/final
    add("mtp: projection, norms, attention", d * own, d * own, true);
    add("mtp: FFN", d * ffn_total, d * ffn_active, true);
  }
  return r;
}

}  // namespace fp8moe
