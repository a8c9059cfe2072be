// The V3-architecture model's parameter and buffer table — name, shape, weight decay, in exactly
// the order the CPU Model creates them (src/model/model.cpp, Model::Model) — built from the
// config alone, without allocating a CPU Model (V3's would hold 671B floats on the host). The GPU
// model (model/model_gpu.h) lays out its FP32 arenas from it; the optimizer and checkpoints read
// the same order. Test: test_model --gtest_filter='ParameterTable*' (equal to a CPU Model's
// parameters() / buffers() for several configs).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fp8moe/model/config.h"

namespace fp8moe {

struct ParameterSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool weight_decay = true;  // the CPU model's flag: false for norms (and buffers) only
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

struct ParameterTable {
  std::vector<ParameterSpec> parameters;  // Model::parameters()'s order
  std::vector<ParameterSpec> buffers;     // Model::buffers()'s order (the routers' biases)
};

// Order: model.embed_tokens.weight; per layer l: input_layernorm, self_attn (q_a_proj,
// q_a_layernorm, q_b_proj | q_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj),
// post_attention_layernorm, mlp (dense: gate_proj, up_proj, down_proj; MoE: gate, experts.<e>
// (gate_proj, up_proj, down_proj), shared_experts); model.norm, lm_head; per MTP depth k (layer
// num_hidden_layers + k): enorm, hnorm, eh_proj, the block (as a layer), shared_head.norm.
ParameterTable model_parameter_table(const ModelConfig& config);

}  // namespace fp8moe
