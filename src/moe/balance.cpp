// Balancing for the gate: the bias update, the sequence-wise loss and its gradient, and load
// metrics. Definitions in include/fp8moe/moe/balance.h.
#include "fp8moe/moe/balance.h"

#include <algorithm>
#include <numeric>

#include "fp8moe/core/error.h"

namespace fp8moe {

std::vector<int64_t> expert_load(const int32_t* topk_idx, int64_t tokens, int top_k,
                                 int num_experts) {
  FM_CHECK_ARG(num_experts > 0 && top_k > 0 && tokens >= 0, "expert_load: E=", num_experts,
               " K=", top_k, " T=", tokens);
  std::vector<int64_t> load(num_experts, 0);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    const int32_t e = topk_idx[i];
    if (e < 0) continue;
    FM_CHECK_ARG(e < num_experts, "topk_idx[", i / top_k, "][", i % top_k, "]=", e,
                 " is outside [0, ", num_experts, ")");
    ++load[e];
  }
  return load;
}

std::vector<int64_t> rank_load(const std::vector<int64_t>& load, const ExpertSharding& sharding) {
  validate_sharding(sharding);
  FM_CHECK_ARG(load.size() == static_cast<size_t>(sharding.num_experts), "load has ", load.size(),
               " experts, sharding ", sharding.num_experts);
  std::vector<int64_t> out(sharding.num_ranks, 0);
  for (int e = 0; e < sharding.num_experts; ++e) out[sharding.rank_of(e)] += load[e];
  return out;
}

double max_violation(const std::vector<double>& load) {
  if (load.empty()) return 0.0;
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  if (total <= 0.0) return 0.0;
  const double mean = total / static_cast<double>(load.size());
  return *std::max_element(load.begin(), load.end()) / mean - 1.0;
}

double max_violation(const std::vector<int64_t>& load) {
  return max_violation(std::vector<double>(load.begin(), load.end()));
}

void update_bias(std::vector<float>& bias, const std::vector<int64_t>& load, float gamma) {
  FM_CHECK_ARG(bias.size() == load.size(), "bias has ", bias.size(), " entries, load ",
               load.size());
  if (load.empty()) return;
  // Compare load_i * E with the total: exact in integers, so "equal to the mean" is exact.
  const int64_t total = std::accumulate(load.begin(), load.end(), int64_t{0});
  const int64_t n = static_cast<int64_t>(load.size());
  for (size_t i = 0; i < load.size(); ++i) {
    const int64_t scaled = load[i] * n;
    const float sign = scaled < total ? 1.0f : (scaled > total ? -1.0f : 0.0f);
    bias[i] += gamma * sign;
  }
}

double sequence_balance_loss(const RouterConfig& config, const RouterOutput& fwd, int64_t seq_len,
                             float alpha, float* grad_logits) {
  validate_router_config(config);
  const int E = config.n_routed_experts, K = config.num_experts_per_tok;
  FM_CHECK_ARG(seq_len > 0 && fwd.tokens % seq_len == 0, "tokens=", fwd.tokens,
               " is not a multiple of seq_len=", seq_len);
  FM_CHECK_ARG(fwd.top_k == K && fwd.scores.size() == static_cast<size_t>(fwd.tokens) * E,
               "forward output does not match the config (K=", fwd.top_k, ", scores ",
               fwd.scores.size(), ")");
  const int64_t num_seq = fwd.tokens / seq_len;
  if (num_seq == 0) return 0.0;
  const double T = static_cast<double>(seq_len);
  double loss = 0.0;
  std::vector<double> f(E), P(E);
  for (int64_t q = 0; q < num_seq; ++q) {
    const int64_t t0 = q * seq_len;
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(P.begin(), P.end(), 0.0);
    for (int64_t t = t0; t < t0 + seq_len; ++t) {
      for (int k = 0; k < K; ++k) f[fwd.topk_idx[t * K + k]] += 1.0;
      const float* s = fwd.scores.data() + t * E;
      double S = 0.0;
      for (int e = 0; e < E; ++e) S += s[e];
      for (int e = 0; e < E; ++e) P[e] += s[e] / S;
    }
    double seq_loss = 0.0;
    for (int e = 0; e < E; ++e) {
      f[e] *= E / (K * T);
      P[e] /= T;
      seq_loss += f[e] * P[e];
    }
    loss += alpha * seq_loss / static_cast<double>(num_seq);
    if (!grad_logits) continue;
    // dL/ds_j = alpha / (T * num_seq) * (f_j / S - sum_i f_i s_i / S^2); ds/dx = s (1 - s).
    const double c = alpha / (T * static_cast<double>(num_seq));
    for (int64_t t = t0; t < t0 + seq_len; ++t) {
      const float* s = fwd.scores.data() + t * E;
      double S = 0.0, fs = 0.0;
      for (int e = 0; e < E; ++e) {
        S += s[e];
        fs += f[e] * s[e];
      }
      for (int e = 0; e < E; ++e) {
        const double g = c * (f[e] / S - fs / (S * S));
        grad_logits[t * E + e] += static_cast<float>(g * s[e] * (1.0 - s[e]));
      }
    }
  }
  return loss;
}

}  // namespace fp8moe
