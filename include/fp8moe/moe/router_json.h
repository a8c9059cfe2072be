// JSON front end of the router (`fp8moe moe route`, DESIGN.md): Hugging Face config names plus
// the logits to route and the optional selection bias.
#pragma once

#include <vector>

#include "fp8moe/core/json.h"
#include "fp8moe/moe/router.h"

namespace fp8moe {

struct RouteRequest {
  RouterConfig config;
  int64_t tokens = 0;
  std::vector<float> logits;  // [T, E]
  std::vector<float> bias;    // [E], empty = zeros
};

// Keys: n_routed_experts, num_experts_per_tok, n_group, topk_group, routed_scaling_factor,
// norm_topk_prob (missing ones take DeepSeek-V3's values), scoring_func (must be "sigmoid"),
// topk_method (must be "noaux_tc"), logits [[E numbers] per token], bias [E numbers].
// Unknown keys, wrong types, ragged or wrong-length rows, NaN and inconsistent configs throw
// kInvalidArgument.
RouteRequest route_request_from_json(const Json& input);
// {"topk_idx": [[K ids] per token], "topk_weight": [[K weights] per token]}
OrderedJson route_output_to_json(const RouterOutput& out);

}  // namespace fp8moe
