// The small V3-shaped model the GPU model and serving tests run (tests/model/model_gpu_test.cu,
// tests/serve/generator_gpu_test.cu): the GPU kernels' head dims (128 / 64 / 128), widths that
// are multiples of 128, 2 layers (one dense, one MoE of 8 experts, top-2 of 4 groups), 2 heads,
// one MTP module; `overrides` replaces fields by their config.json names.
#pragma once

#include <string>

#include "fp8moe/core/json.h"
#include "fp8moe/model/config.h"

namespace fp8moe::test {

inline ModelConfig small_gpu_config(const Json& overrides = Json::object(),
                                    const std::string& what = "small GPU test config") {
  Json j = {{"vocab_size", 512},
            {"hidden_size", 256},
            {"intermediate_size", 384},
            {"moe_intermediate_size", 128},
            {"num_hidden_layers", 2},
            {"first_k_dense_replace", 1},
            {"n_routed_experts", 8},
            {"n_shared_experts", 1},
            {"num_experts_per_tok", 2},
            {"n_group", 4},
            {"topk_group", 2},
            {"routed_scaling_factor", 2.5},
            {"norm_topk_prob", true},
            {"aux_loss_alpha", 1e-3},
            {"seq_aux", true},
            {"num_attention_heads", 2},
            {"num_key_value_heads", 2},
            {"q_lora_rank", 128},
            {"kv_lora_rank", 128},
            {"qk_nope_head_dim", 128},
            {"qk_rope_head_dim", 64},
            {"v_head_dim", 128},
            {"num_nextn_predict_layers", 1},
            {"max_position_embeddings", 4096},
            {"rope_theta", 10000},
            {"rope_scaling", nullptr},
            {"rms_norm_eps", 1e-6},
            {"initializer_range", 0.02}};
  for (auto it = overrides.begin(); it != overrides.end(); ++it) j[it.key()] = it.value();
  return parse_model_config(j, what);
}

}  // namespace fp8moe::test
