// DeepSeek-V3's gate on the CPU: the reference that the CUDA router and the model are checked
// against. Semantics and tie rules are documented in include/fp8moe/moe/router.h.
#include "fp8moe/moe/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "fp8moe/core/error.h"

namespace fp8moe {

void validate_router_config(const RouterConfig& c) {
  FM_CHECK_ARG(c.n_routed_experts > 0, "n_routed_experts=", c.n_routed_experts, " must be > 0");
  FM_CHECK_ARG(c.n_group > 0, "n_group=", c.n_group, " must be > 0");
  FM_CHECK_ARG(c.n_routed_experts % c.n_group == 0, "n_routed_experts=", c.n_routed_experts,
               " is not divisible by n_group=", c.n_group);
  FM_CHECK_ARG(c.topk_group >= 1 && c.topk_group <= c.n_group, "topk_group=", c.topk_group,
               " must be in [1, n_group=", c.n_group, "]");
  const int kept = c.topk_group * (c.n_routed_experts / c.n_group);
  FM_CHECK_ARG(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= kept,
               "num_experts_per_tok=", c.num_experts_per_tok, " must be in [1, ", kept,
               "] (the experts of topk_group=", c.topk_group, " groups of ",
               c.n_routed_experts / c.n_group, ")");
  FM_CHECK_ARG(std::isfinite(c.routed_scaling_factor), "routed_scaling_factor is not finite");
}

float router_sigmoid(float x) {
  // NOTE: computed in double and rounded once, so that the GPU (which does the same) gets the
  // identical float and therefore the identical selection.
  return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(x))));
}

namespace {

// "a is preferred to b": larger value, then lower index.
inline bool better(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Per-call buffers, so that routing a batch allocates once.
struct RouterScratch {
  std::vector<float> biased, group_score;
  std::vector<uint8_t> group_kept;
  std::vector<float> best_value;
  std::vector<int32_t> chosen;
  explicit RouterScratch(const RouterConfig& c)
      : biased(c.n_routed_experts),
        group_score(c.n_group),
        group_kept(c.n_group),
        best_value(c.num_experts_per_tok),
        chosen(c.num_experts_per_tok) {}
};

void route_token(const RouterConfig& c, const float* logits, const float* bias,
                 RouterScratch& scratch, float* scores, int32_t* topk_idx, float* topk_weight) {
  const int E = c.n_routed_experts, G = c.n_group, per_group = E / G, K = c.num_experts_per_tok;
  float* b = scratch.biased.data();
  for (int e = 0; e < E; ++e) {
    scores[e] = router_sigmoid(logits[e]);
    b[e] = scores[e] + (bias ? bias[e] : 0.0f);
  }
  // Group scores: the sum of the two largest biased scores (the one score when a group holds a
  // single expert); keep the topk_group best groups.
  uint8_t* kept = scratch.group_kept.data();
  std::fill(kept, kept + G, uint8_t{c.topk_group == G});
  if (c.topk_group < G) {
    float* gscore = scratch.group_score.data();
    for (int g = 0; g < G; ++g) {
      float m1 = -INFINITY, m2 = -INFINITY;
      for (int j = 0; j < per_group; ++j) {
        const float v = b[g * per_group + j];
        if (v > m1) {
          m2 = m1;
          m1 = v;
        } else if (v > m2) {
          m2 = v;
        }
      }
      gscore[g] = per_group >= 2 ? m1 + m2 : m1;
    }
    for (int pick = 0; pick < c.topk_group; ++pick) {
      int best = -1;
      for (int g = 0; g < G; ++g)
        if (!kept[g] && (best < 0 || better(gscore[g], g, gscore[best], best))) best = g;
      kept[best] = 1;
    }
  }
  // Top-K among the kept groups' experts: one pass keeping the K best seen so far, sorted by
  // (value desc, id asc); the K best under that strict order are unique, so the pass order
  // does not matter.
  float* best_v = scratch.best_value.data();
  int32_t* chosen = scratch.chosen.data();
  int count = 0;
  for (int g = 0; g < G; ++g) {
    if (!kept[g]) continue;
    for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
      const float v = b[e];
      if (count == K && !better(v, e, best_v[K - 1], chosen[K - 1])) continue;
      int pos = count < K ? count++ : K - 1;
      while (pos > 0 && better(v, e, best_v[pos - 1], chosen[pos - 1])) {
        best_v[pos] = best_v[pos - 1];
        chosen[pos] = chosen[pos - 1];
        --pos;
      }
      best_v[pos] = v;
      chosen[pos] = e;
    }
  }
  std::sort(chosen, chosen + K);
  // Weights from the unbiased scores; the sum runs in ascending expert order.
  float sum = 0.0f;
  for (int k = 0; k < K; ++k) sum += scores[chosen[k]];
  for (int k = 0; k < K; ++k) {
    topk_idx[k] = chosen[k];
    const float s = scores[chosen[k]];
    topk_weight[k] = (c.norm_topk_prob ? s / sum : s) * c.routed_scaling_factor;
  }
}

}  // namespace

RouterOutput route(const RouterConfig& config, const float* logits, int64_t tokens,
                   const float* bias) {
  validate_router_config(config);
  FM_CHECK_ARG(tokens >= 0, "tokens=", tokens, " must be >= 0");
  const int E = config.n_routed_experts, K = config.num_experts_per_tok;
  if (bias) {
    for (int e = 0; e < E; ++e)
      FM_CHECK_ARG(std::isfinite(bias[e]), "bias[", e, "]=", bias[e], " is not finite");
  }
  RouterOutput out;
  out.tokens = tokens;
  out.top_k = K;
  out.topk_idx.resize(static_cast<size_t>(tokens) * K);
  out.topk_weight.resize(static_cast<size_t>(tokens) * K);
  out.scores.resize(static_cast<size_t>(tokens) * E);
  RouterScratch scratch(config);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = logits + t * E;
    for (int e = 0; e < E; ++e)
      FM_CHECK_ARG(!std::isnan(row[e]), "logits[", t, "][", e, "] is NaN");
    route_token(config, row, bias, scratch, out.scores.data() + t * E, out.topk_idx.data() + t * K,
                out.topk_weight.data() + t * K);
  }
  return out;
}

void route_backward(const RouterConfig& config, const RouterOutput& forward,
                    const float* grad_weight, float* grad_logits) {
  validate_router_config(config);
  const int E = config.n_routed_experts, K = config.num_experts_per_tok;
  FM_CHECK_ARG(forward.top_k == K, "forward.top_k=", forward.top_k, " but config has K=", K);
  FM_CHECK_ARG(forward.scores.size() == static_cast<size_t>(forward.tokens) * E,
               "forward.scores holds ", forward.scores.size(),
               " values, expected T*E=", forward.tokens * E);
  const double c = config.routed_scaling_factor;
  std::fill(grad_logits, grad_logits + forward.tokens * E, 0.0f);
  for (int64_t t = 0; t < forward.tokens; ++t) {
    const float* s = forward.scores.data() + t * E;
    const int32_t* idx = forward.topk_idx.data() + t * K;
    const float* g = grad_weight + t * K;
    // w_i = c * s_i / S  =>  dL/ds_j = c * (g_j / S - sum_i g_i s_i / S^2); without the
    // normalisation dL/ds_j = c * g_j. Then ds/dlogit = s (1 - s).
    double S = 0.0, gs = 0.0;
    for (int k = 0; k < K; ++k) {
      S += s[idx[k]];
      gs += static_cast<double>(g[k]) * s[idx[k]];
    }
    for (int k = 0; k < K; ++k) {
      const double sj = s[idx[k]];
      const double grad_s = config.norm_topk_prob ? c * (g[k] / S - gs / (S * S)) : c * g[k];
      grad_logits[t * E + idx[k]] = static_cast<float>(grad_s * sj * (1.0 - sj));
    }
  }
}

}  // namespace fp8moe
