// The router's CPU reference on hand-computed cases: group limits, ties, scaling, bias only in
// selection, node limits, and the backward pass against finite differences.
#include "fp8moe/moe/router.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"

namespace fp8moe {
namespace {

float logit(double p) {
  return static_cast<float>(std::log(p / (1.0 - p)));
}

std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> out;
  for (double p : probs) out.push_back(logit(p));
  return out;
}

RouterConfig small_config() {
  RouterConfig c;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5f;
  c.norm_topk_prob = true;
  return c;
}

TEST(Router, SigmoidIsDoubleRoundedOnce) {
  EXPECT_EQ(router_sigmoid(0.0f), 0.5f);
  EXPECT_EQ(router_sigmoid(INFINITY), 1.0f);
  EXPECT_EQ(router_sigmoid(-INFINITY), 0.0f);
  EXPECT_EQ(router_sigmoid(1.0f), static_cast<float>(1.0 / (1.0 + std::exp(-1.0))));
}

TEST(Router, GroupLimitExcludesTheBestExpertOfAWeakGroup) {
  // groups: {0,1} {2,3} {4,5} {6,7}; expert 6 has the highest score but its group sums to
  // 0.95 + 0.01 = 0.96, below groups 2 (0.8 + 0.7 = 1.5) and 1 (0.6 + 0.5 = 1.1).
  const auto logits = logits_of({0.3, 0.2, 0.6, 0.5, 0.8, 0.7, 0.95, 0.01});
  const RouterOutput out = route(small_config(), logits.data(), 1, nullptr);
  ASSERT_EQ(out.topk_idx, (std::vector<int32_t>{4, 5}));
  // weights: s / (0.8 + 0.7) * 2.5
  EXPECT_NEAR(out.topk_weight[0], 0.8 / 1.5 * 2.5, 1e-6);
  EXPECT_NEAR(out.topk_weight[1], 0.7 / 1.5 * 2.5, 1e-6);
  // With every group kept, expert 6 wins.
  RouterConfig all = small_config();
  all.topk_group = 4;
  const RouterOutput out_all = route(all, logits.data(), 1, nullptr);
  EXPECT_EQ(out_all.topk_idx, (std::vector<int32_t>{4, 6}));
}

TEST(Router, GroupScoreIsTheSumOfTheTopTwo) {
  // Group 0 = {0.9, 0.05}: best single expert but sum 0.95; group 1 = {0.5, 0.5}: sum 1.0.
  // With topk_group = 1 the second group wins although it holds no top expert.
  RouterConfig c = small_config();
  c.topk_group = 1;
  const auto logits = logits_of({0.9, 0.05, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1});
  const RouterOutput out = route(c, logits.data(), 1, nullptr);
  EXPECT_EQ(out.topk_idx, (std::vector<int32_t>{2, 3}));
  EXPECT_NEAR(out.topk_weight[0], 1.25, 1e-6);
  EXPECT_NEAR(out.topk_weight[1], 1.25, 1e-6);
}

TEST(Router, TiesGoToTheLowerIndex) {
  // All equal: groups 0 and 1 are kept, experts 0 and 1 chosen.
  std::vector<float> logits(8, 0.3f);
  RouterOutput out = route(small_config(), logits.data(), 1, nullptr);
  EXPECT_EQ(out.topk_idx, (std::vector<int32_t>{0, 1}));
  EXPECT_FLOAT_EQ(out.topk_weight[0], 1.25f);
  // Groups 1 and 3 tie for the top group score, group 2 is third: {1, 3} kept (topk_group 2).
  // Inside them, experts 3 and 7 tie at the top: the lower id, 3, wins the first pick; then 7.
  logits = logits_of({0.1, 0.1, 0.5, 0.9, 0.3, 0.3, 0.5, 0.9});
  out = route(small_config(), logits.data(), 1, nullptr);
  EXPECT_EQ(out.topk_idx, (std::vector<int32_t>{3, 7}));
  RouterConfig k3 = small_config();
  k3.num_experts_per_tok = 3;
  out = route(k3, logits.data(), 1, nullptr);
  // Third pick: 2 and 6 tie at 0.5 -> 2.
  EXPECT_EQ(out.topk_idx, (std::vector<int32_t>{2, 3, 7}));
}

TEST(Router, BiasChangesSelectionOnlyNotWeights) {
  RouterConfig c = small_config();
  c.topk_group = 4;
  const auto logits = logits_of({0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6});
  std::vector<float> bias(8, 0.0f);
  bias[2] = 1.0f;  // pushes expert 2 (s = 0.1) to the top
  const RouterOutput out = route(c, logits.data(), 1, bias.data());
  ASSERT_EQ(out.topk_idx, (std::vector<int32_t>{0, 2}));
  EXPECT_NEAR(out.topk_weight[0], 0.9 / 1.0 * 2.5, 1e-6);
  EXPECT_NEAR(out.topk_weight[1], 0.1 / 1.0 * 2.5, 1e-6);
  // Scores are the unbiased sigmoid.
  EXPECT_NEAR(out.scores[2], 0.1, 1e-7);
  // Bias also moves group scores: group 1 = {0.1 + 1, 0.2 + 0.5} = 1.8 beats group 0 = 1.7.
  RouterConfig g1 = small_config();
  g1.topk_group = 1;
  bias[3] = 0.5f;
  const RouterOutput out_g = route(g1, logits.data(), 1, bias.data());
  EXPECT_EQ(out_g.topk_idx, (std::vector<int32_t>{2, 3}));
  EXPECT_NEAR(out_g.topk_weight[0], 0.1 / 0.3 * 2.5, 1e-6);
  EXPECT_NEAR(out_g.topk_weight[1], 0.2 / 0.3 * 2.5, 1e-6);
}

TEST(Router, ScalingAndNormalisation) {
  RouterConfig c = small_config();
  c.topk_group = 4;
  c.num_experts_per_tok = 3;
  c.routed_scaling_factor = 1.5f;
  const auto logits = logits_of({0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7});
  RouterOutput out = route(c, logits.data(), 1, nullptr);
  ASSERT_EQ(out.topk_idx, (std::vector<int32_t>{0, 1, 7}));
  EXPECT_NEAR(out.topk_weight[0] + out.topk_weight[1] + out.topk_weight[2], 1.5, 1e-6);
  EXPECT_NEAR(out.topk_weight[2], 0.7 / 2.4 * 1.5, 1e-6);
  c.norm_topk_prob = false;
  out = route(c, logits.data(), 1, nullptr);
  EXPECT_NEAR(out.topk_weight[0], 0.9 * 1.5, 1e-6);
  EXPECT_NEAR(out.topk_weight[2], 0.7 * 1.5, 1e-6);
  // K = 1 with normalisation: the weight is the scaling factor itself.
  c.norm_topk_prob = true;
  c.num_experts_per_tok = 1;
  out = route(c, logits.data(), 1, nullptr);
  EXPECT_EQ(out.topk_idx[0], 0);
  EXPECT_FLOAT_EQ(out.topk_weight[0], 1.5f);
}

TEST(Router, NodeLimitedRoutingReachesAtMostMNodes) {
  // V3 shape: 256 experts, 8 groups (= nodes), each token on at most 4 nodes.
  RouterConfig c;
  const int T = 300, E = c.n_routed_experts;
  std::vector<float> logits(T * E), bias(E);
  PhiloxStream rng(7, 0);
  for (auto& v : logits) v = rng.normal() * 2.0f;
  for (auto& v : bias) v = rng.uniform(-0.2f, 0.2f);
  const RouterOutput out = route(c, logits.data(), T, bias.data());
  for (int t = 0; t < T; ++t) {
    std::set<int> nodes;
    for (int k = 0; k < c.num_experts_per_tok; ++k) {
      const int e = out.topk_idx[t * 8 + k];
      if (k > 0) {
        EXPECT_LT(out.topk_idx[t * 8 + k - 1], e);
      }
      nodes.insert(e / 32);
    }
    EXPECT_LE(nodes.size(), 4u) << "token " << t;
    double sum = 0;
    for (int k = 0; k < 8; ++k) sum += out.topk_weight[t * 8 + k];
    EXPECT_NEAR(sum, 2.5, 1e-5);
  }
}

TEST(Router, BruteForceAgreesOnRandomInputs) {
  // Group choice and expert choice recomputed independently by sorting.
  RouterConfig c;
  c.n_routed_experts = 64;
  c.n_group = 8;
  c.topk_group = 3;
  c.num_experts_per_tok = 6;
  const int T = 200, E = 64, per = 8;
  std::vector<float> logits(T * E), bias(E);
  PhiloxStream rng(11, 0);
  // Few distinct values so that ties happen often.
  for (auto& v : logits) v = static_cast<float>(static_cast<int>(rng.uniform() * 6)) * 0.25f;
  for (auto& v : bias) v = static_cast<float>(static_cast<int>(rng.uniform() * 3)) * 0.125f;
  const RouterOutput out = route(c, logits.data(), T, bias.data());
  for (int t = 0; t < T; ++t) {
    std::vector<float> b(E);
    for (int e = 0; e < E; ++e) b[e] = router_sigmoid(logits[t * E + e]) + bias[e];
    std::vector<std::pair<float, int>> groups;
    for (int g = 0; g < 8; ++g) {
      std::vector<float> v(b.begin() + g * per, b.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({-(v[0] + v[1]), g});
    }
    std::sort(groups.begin(), groups.end());
    std::vector<std::pair<float, int>> cand;
    for (int i = 0; i < 3; ++i)
      for (int e = groups[i].second * per; e < (groups[i].second + 1) * per; ++e)
        cand.push_back({-b[e], e});
    std::sort(cand.begin(), cand.end());
    std::vector<int32_t> want;
    for (int k = 0; k < 6; ++k) want.push_back(cand[k].second);
    std::sort(want.begin(), want.end());
    EXPECT_EQ(std::vector<int32_t>(out.topk_idx.begin() + t * 6, out.topk_idx.begin() + t * 6 + 6),
              want)
        << "token " << t;
  }
}

TEST(Router, BackwardMatchesFiniteDifferences) {
  for (bool norm : {true, false}) {
    RouterConfig c = small_config();
    c.n_routed_experts = 16;
    c.num_experts_per_tok = 3;
    c.norm_topk_prob = norm;
    const int T = 5, E = 16, K = 3;
    std::vector<float> logits(T * E), gw(T * K);
    PhiloxStream rng(3, 0);
    for (auto& v : logits) v = rng.normal();
    for (auto& v : gw) v = rng.normal();
    const RouterOutput fwd = route(c, logits.data(), T, nullptr);
    std::vector<float> grad(T * E);
    route_backward(c, fwd, gw.data(), grad.data());
    // L = sum gw * w; selection held fixed (the step is small enough not to change it here,
    // checked below).
    auto loss = [&](const std::vector<float>& l) {
      const RouterOutput o = route(c, l.data(), T, nullptr);
      EXPECT_EQ(o.topk_idx, fwd.topk_idx);
      double s = 0;
      for (int i = 0; i < T * K; ++i) s += static_cast<double>(gw[i]) * o.topk_weight[i];
      return s;
    };
    const float h = 1e-2f;
    double max_err = 0;
    for (int i = 0; i < T * E; ++i) {
      std::vector<float> p = logits, m = logits;
      p[i] += h;
      m[i] -= h;
      const double fd = (loss(p) - loss(m)) / (2.0 * h);
      max_err = std::max(max_err, std::abs(fd - grad[i]));
      if (std::find(fwd.topk_idx.begin() + (i / E) * K, fwd.topk_idx.begin() + (i / E + 1) * K,
                    i % E) == fwd.topk_idx.begin() + (i / E + 1) * K) {
        EXPECT_EQ(grad[i], 0.0f) << "unchosen expert got gradient at " << i;
      }
    }
    EXPECT_LT(max_err, 2e-3) << "norm=" << norm;
  }
}

TEST(Router, RejectsInconsistentConfigs) {
  RouterConfig c = small_config();
  c.n_group = 3;
  EXPECT_THROW(validate_router_config(c), Error);
  c = small_config();
  c.topk_group = 5;
  EXPECT_THROW(validate_router_config(c), Error);
  c = small_config();
  c.topk_group = 1;
  c.num_experts_per_tok = 3;  // one group holds 2
  EXPECT_THROW(validate_router_config(c), Error);
  c.num_experts_per_tok = 2;
  EXPECT_NO_THROW(validate_router_config(c));
  std::vector<float> logits(8, 0.0f);
  logits[3] = NAN;
  EXPECT_THROW(route(small_config(), logits.data(), 1, nullptr), Error);
}

}  // namespace
}  // namespace fp8moe
