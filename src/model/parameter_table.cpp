#include "fp8moe/model/parameter_table.h"

namespace fp8moe {

namespace {

struct Builder {
  ParameterTable table;
  void param(const std::string& name, std::vector<int64_t> shape, bool is_norm) {
    table.parameters.push_back(ParameterSpec{name, std::move(shape), !is_norm});
  }
  void norm(const std::string& name, int64_t dim) { param(name, {dim}, true); }
  void linear(const std::string& name, int64_t in, int64_t out) { param(name, {out, in}, false); }
  void mlp(const std::string& pre, int64_t hidden, int64_t inter) {
    linear(pre + ".gate_proj.weight", hidden, inter);
    linear(pre + ".up_proj.weight", hidden, inter);
    linear(pre + ".down_proj.weight", inter, hidden);
  }
  // Block::init (Mla::init, Moe::init, Mlp::init) of src/model/model.cpp.
  void block(const std::string& pre, const ModelConfig& c, bool is_moe) {
    const int64_t h = c.hidden_size, heads = c.num_attention_heads;
    const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim;
    norm(pre + ".input_layernorm.weight", h);
    const std::string a = pre + ".self_attn";
    if (c.q_lora_rank > 0) {
      linear(a + ".q_a_proj.weight", h, c.q_lora_rank);
      norm(a + ".q_a_layernorm.weight", c.q_lora_rank);
      linear(a + ".q_b_proj.weight", c.q_lora_rank, heads * (dn + dr));
    } else {
      linear(a + ".q_proj.weight", h, heads * (dn + dr));
    }
    linear(a + ".kv_a_proj_with_mqa.weight", h, c.kv_lora_rank + dr);
    norm(a + ".kv_a_layernorm.weight", c.kv_lora_rank);
    linear(a + ".kv_b_proj.weight", c.kv_lora_rank, heads * (dn + dv));
    linear(a + ".o_proj.weight", heads * dv, h);
    norm(pre + ".post_attention_layernorm.weight", h);
    const std::string m = pre + ".mlp";
    if (!is_moe) {
      mlp(m, h, c.intermediate_size);
      return;
    }
    param(m + ".gate.weight", {c.n_routed_experts, h}, false);
    table.buffers.push_back(
        ParameterSpec{m + ".gate.e_score_correction_bias", {c.n_routed_experts}, false});
    for (int64_t e = 0; e < c.n_routed_experts; ++e)
      mlp(m + ".experts." + std::to_string(e), h, c.moe_intermediate_size);
    if (c.n_shared_experts > 0)
      mlp(m + ".shared_experts", h, c.moe_intermediate_size * c.n_shared_experts);
  }
};

}  // namespace

ParameterTable model_parameter_table(const ModelConfig& c) {
  c.validate();
  Builder b;
  const int64_t h = c.hidden_size;
  b.param("model.embed_tokens.weight", {c.vocab_size, h}, false);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    b.block("model.layers." + std::to_string(l), c, c.is_moe_layer(l));
  b.norm("model.norm.weight", h);
  b.linear("lm_head.weight", h, c.vocab_size);
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    const int64_t layer = c.num_hidden_layers + k;
    const std::string pre = "model.layers." + std::to_string(layer);
    b.norm(pre + ".enorm.weight", h);
    b.norm(pre + ".hnorm.weight", h);
    b.linear(pre + ".eh_proj.weight", 2 * h, h);
    b.block(pre, c, c.is_moe_layer(layer));
    b.norm(pre + ".shared_head.norm.weight", h);
  }
  return std::move(b.table);
}

}  // namespace fp8moe
