// Balancing: the bias update's sign rule, MaxVio, the sequence-wise loss against hand values
// and finite differences, and the bias update driving MaxVio down on a skewed stream.
#include "fp8moe/moe/balance.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "fp8moe/core/philox.h"

namespace fp8moe {
namespace {

TEST(Balance, MetricsAndBiasUpdate) {
  const std::vector<int64_t> load = {4, 2, 2, 0};  // mean 2
  EXPECT_DOUBLE_EQ(max_violation(load), 1.0);
  EXPECT_DOUBLE_EQ(max_violation(std::vector<int64_t>{0, 0}), 0.0);
  EXPECT_EQ(rank_load(load, {4, 2}), (std::vector<int64_t>{6, 2}));
  std::vector<float> bias = {0.0f, 0.5f, 0.0f, -0.25f};
  update_bias(bias, load, 0.125f);
  EXPECT_EQ(bias, (std::vector<float>{-0.125f, 0.5f, 0.0f, -0.125f}));
  const std::vector<int32_t> ids = {0, 1, 0, 3, -1, 0};
  EXPECT_EQ(expert_load(ids.data(), 3, 2, 4), (std::vector<int64_t>{3, 1, 0, 1}));
}

TEST(Balance, SequenceLossHandValue) {
  // One sequence of 2 tokens, 4 experts, top-1, one group. Token 0 logits 0 everywhere except
  // expert 0 (chosen); token 1 chooses expert 3.
  RouterConfig c;
  c.n_routed_experts = 4;
  c.num_experts_per_tok = 1;
  c.n_group = 1;
  c.topk_group = 1;
  c.routed_scaling_factor = 1.0f;
  const std::vector<float> logits = {2, 0, 0, 0, 0, 0, 0, 3};
  const RouterOutput fwd = route(c, logits.data(), 2, nullptr);
  ASSERT_EQ(fwd.topk_idx, (std::vector<int32_t>{0, 3}));
  // f = E/(K T) * counts = 4/2 * {1, 0, 0, 1} = {2, 0, 0, 2}
  // P_i = mean over tokens of s_i / sum s.
  const double a = 1 / (1 + std::exp(-2.0)), h = 0.5, b = 1 / (1 + std::exp(-3.0));
  const double P0 = (a / (a + 3 * h) + h / (3 * h + b)) / 2;
  const double P3 = (h / (a + 3 * h) + b / (3 * h + b)) / 2;
  const double want = 0.01 * (2 * P0 + 2 * P3);
  EXPECT_NEAR(sequence_balance_loss(c, fwd, 2, 0.01f, nullptr), want, 1e-9);
  // Two sequences of one token each: the mean of the two per-sequence losses.
  const double l0 = 0.01 * 4 * (a / (a + 3 * h));
  const double l1 = 0.01 * 4 * (b / (3 * h + b));
  EXPECT_NEAR(sequence_balance_loss(c, fwd, 1, 0.01f, nullptr), (l0 + l1) / 2, 1e-9);
}

TEST(Balance, SequenceLossGradientMatchesFiniteDifferences) {
  RouterConfig c;
  c.n_routed_experts = 16;
  c.num_experts_per_tok = 4;
  c.n_group = 4;
  c.topk_group = 2;
  const int T = 6, E = 16;
  std::vector<float> logits(T * E);
  PhiloxStream rng(17, 0);
  for (auto& v : logits) v = rng.normal();
  const RouterOutput fwd = route(c, logits.data(), T, nullptr);
  std::vector<float> grad(T * E, 0.0f);
  sequence_balance_loss(c, fwd, 3, 0.5f, grad.data());
  const float h = 1e-2f;
  double max_err = 0, max_grad = 0;
  int skipped = 0;
  for (int i = 0; i < T * E; ++i) {
    std::vector<float> p = logits, m = logits;
    p[i] += h;
    m[i] -= h;
    const RouterOutput fp = route(c, p.data(), T, nullptr), fm = route(c, m.data(), T, nullptr);
    // The loss is piecewise smooth: skip the few coordinates whose step flips a near-tie.
    if (fp.topk_idx != fwd.topk_idx || fm.topk_idx != fwd.topk_idx) {
      ++skipped;
      continue;
    }
    const double fd = (sequence_balance_loss(c, fp, 3, 0.5f, nullptr) -
                       sequence_balance_loss(c, fm, 3, 0.5f, nullptr)) /
                      (2.0 * h);
    max_err = std::max(max_err, std::abs(fd - grad[i]));
    max_grad = std::max(max_grad, std::abs(static_cast<double>(grad[i])));
  }
  EXPECT_LT(skipped, T * E / 10);
  EXPECT_GT(max_grad, 1e-3);
  EXPECT_LT(max_err, 1e-4 + 1e-2 * max_grad);
}

TEST(Balance, BiasUpdateDrivesMaxVioDownOnASkewedStream) {
  RouterConfig c;  // DeepSeek-V3 gate: 256 experts, top-8, 8 groups, 4 kept
  const int E = 256, T = 512, K = 8;
  // Fixed per-expert popularity (skewed) plus per-token noise.
  PhiloxStream pop_rng(1, 0);
  std::vector<float> popularity(E);
  for (auto& p : popularity) p = 1.5f * pop_rng.normal();
  std::vector<float> bias(E, 0.0f), logits(T * E);
  PhiloxStream rng(2, 0);
  double first = 0, last = 0;
  const int steps = 120;
  for (int step = 0; step < steps; ++step) {
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) logits[t * E + e] = popularity[e] + rng.normal();
    const RouterOutput out = route(c, logits.data(), T, bias.data());
    const std::vector<int64_t> load = expert_load(out.topk_idx.data(), T, K, E);
    const double vio = max_violation(load);
    if (step < 5) first += vio / 5;
    if (step >= steps - 5) last += vio / 5;
    update_bias(bias, load, 0.01f);
  }
  EXPECT_GT(first, 3.0);         // heavily skewed at the start
  EXPECT_LT(last, 0.5 * first);  // the bias update at least halves it
}

}  // namespace
}  // namespace fp8moe
