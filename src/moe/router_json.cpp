// JSON front end of the router; see include/fp8moe/moe/router_json.h.
#include "fp8moe/moe/router_json.h"

#include <cmath>
#include <string>

#include "fp8moe/core/error.h"

namespace fp8moe {

namespace {

int get_positive_int(const Json& in, const char* key, int fallback, const std::string& ctx) {
  if (!in.contains(key)) return fallback;
  const Json& v = in.at(key);
  FM_CHECK_ARG(v.is_number_integer(), ctx, ": '", key, "' must be an integer");
  const int64_t x = v.get<int64_t>();
  FM_CHECK_ARG(x > 0 && x <= (int64_t{1} << 20), ctx, ": '", key, "'=", x, " is out of range");
  return static_cast<int>(x);
}

std::vector<float> number_row(const Json& row, size_t expected, const std::string& what) {
  FM_CHECK_ARG(row.is_array(), what, " is not an array");
  FM_CHECK_ARG(row.size() == expected, what, " has ", row.size(), " entries, expected ", expected);
  std::vector<float> out(expected);
  for (size_t i = 0; i < expected; ++i) {
    FM_CHECK_ARG(row[i].is_number(), what, "[", i, "] is not a number");
    out[i] = static_cast<float>(row[i].get<double>());
    FM_CHECK_ARG(!std::isnan(out[i]), what, "[", i, "] is NaN");
  }
  return out;
}

}  // namespace

RouteRequest route_request_from_json(const Json& in) {
  const std::string ctx = "route input";
  FM_CHECK_ARG(in.is_object(), ctx, ": expected a JSON object");
  check_known_keys(
      in,
      {"n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
       "norm_topk_prob", "scoring_func", "topk_method", "logits", "bias"},
      ctx);
  RouteRequest r;
  RouterConfig& c = r.config;
  c.n_routed_experts = get_positive_int(in, "n_routed_experts", c.n_routed_experts, ctx);
  c.num_experts_per_tok = get_positive_int(in, "num_experts_per_tok", c.num_experts_per_tok, ctx);
  c.n_group = get_positive_int(in, "n_group", c.n_group, ctx);
  c.topk_group = get_positive_int(in, "topk_group", c.topk_group, ctx);
  if (in.contains("routed_scaling_factor")) {
    FM_CHECK_ARG(in.at("routed_scaling_factor").is_number(), ctx,
                 ": 'routed_scaling_factor' must be a number");
    c.routed_scaling_factor = static_cast<float>(in.at("routed_scaling_factor").get<double>());
  }
  if (in.contains("norm_topk_prob")) {
    FM_CHECK_ARG(in.at("norm_topk_prob").is_boolean(), ctx, ": 'norm_topk_prob' must be a boolean");
    c.norm_topk_prob = in.at("norm_topk_prob").get<bool>();
  }
  if (in.contains("scoring_func")) {
    const Json& v = in.at("scoring_func");
    FM_CHECK_ARG(v.is_string() && v.get<std::string>() == "sigmoid", ctx,
                 ": scoring_func must be \"sigmoid\" (DeepSeek-V3's gate)");
  }
  if (in.contains("topk_method")) {
    const Json& v = in.at("topk_method");
    FM_CHECK_ARG(v.is_string() && v.get<std::string>() == "noaux_tc", ctx,
                 ": topk_method must be \"noaux_tc\"");
  }
  validate_router_config(c);
  const size_t E = static_cast<size_t>(c.n_routed_experts);
  FM_CHECK_ARG(in.contains("logits"), ctx, ": missing key 'logits'");
  const Json& logits = in.at("logits");
  FM_CHECK_ARG(logits.is_array(), ctx, ": 'logits' must be an array of rows");
  r.tokens = static_cast<int64_t>(logits.size());
  r.logits.reserve(r.tokens * E);
  for (size_t t = 0; t < logits.size(); ++t) {
    const std::vector<float> row =
        number_row(logits[t], E, ctx + ": logits[" + std::to_string(t) + "]");
    r.logits.insert(r.logits.end(), row.begin(), row.end());
  }
  if (in.contains("bias") && !in.at("bias").is_null()) {
    r.bias = number_row(in.at("bias"), E, ctx + ": bias");
    for (size_t e = 0; e < E; ++e)
      FM_CHECK_ARG(std::isfinite(r.bias[e]), ctx, ": bias[", e, "] is not finite");
  }
  return r;
}

OrderedJson route_output_to_json(const RouterOutput& out) {
  OrderedJson idx = OrderedJson::array(), weight = OrderedJson::array();
  const int K = out.top_k;
  for (int64_t t = 0; t < out.tokens; ++t) {
    idx.push_back(
        std::vector<int32_t>(out.topk_idx.begin() + t * K, out.topk_idx.begin() + (t + 1) * K));
    weight.push_back(
        std::vector<float>(out.topk_weight.begin() + t * K, out.topk_weight.begin() + (t + 1) * K));
  }
  OrderedJson j;
  j["topk_idx"] = std::move(idx);
  j["topk_weight"] = std::move(weight);
  return j;
}

}  // namespace fp8moe
