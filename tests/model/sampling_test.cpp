// sample_token (model/sampling.h): greedy picks the first maximum; the nucleus never leaves the
// top_p mass; draws follow the softmax (a chi-square-free check: frequencies within 3 sigma).
// Run: test_model --gtest_filter='Sampling*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/model/sampling.h"

namespace fp8moe {
namespace {

TEST(Sampling, GreedyTakesTheFirstMaximum) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  PhiloxStream rng(1, 2);
  EXPECT_EQ(sample_token(logits.data(), 4, 0.0, 1.0, rng), 1);
}

TEST(Sampling, NucleusKeepsOnlyTheTopMass) {
  // Probabilities ~ 0.66, 0.24, 0.09, 0.01: top_p 0.5 keeps token 0 only, 0.8 tokens 0 and 1.
  const std::vector<float> logits = {3.0f, 2.0f, 1.0f, -1.0f};
  PhiloxStream rng(3, 4);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(sample_token(logits.data(), 4, 1.0, 0.5, rng), 0);
  for (int i = 0; i < 200; ++i) EXPECT_LE(sample_token(logits.data(), 4, 1.0, 0.8, rng), 1);
}

TEST(Sampling, FrequenciesFollowTheSoftmax) {
  const std::vector<float> logits = {1.0f, 0.0f, 0.5f};
  double z = 0;
  for (float l : logits) z += std::exp(l / 0.7);
  PhiloxStream rng(5, 6);
  std::vector<int> count(3, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++count[sample_token(logits.data(), 3, 0.7, 1.0, rng)];
  for (int v = 0; v < 3; ++v) {
    const double p = std::exp(logits[v] / 0.7) / z;
    EXPECT_NEAR(count[v] / static_cast<double>(n), p, 3 * std::sqrt(p * (1 - p) / n)) << v;
  }
}

TEST(Sampling, TokenProbsAreSampleTokensDistribution) {
  const std::vector<float> logits = {3.0f, 2.0f, 1.0f, -1.0f};
  std::vector<double> p;
  token_probs(logits.data(), 4, 0.0, 1.0, p);
  EXPECT_EQ(p, (std::vector<double>{1, 0, 0, 0}));
  token_probs(logits.data(), 4, 1.0, 0.5, p);  // the nucleus of sample_token's test above
  EXPECT_EQ(p, (std::vector<double>{1, 0, 0, 0}));
  token_probs(logits.data(), 4, 1.0, 0.8, p);
  EXPECT_GT(p[0], p[1]);
  EXPECT_GT(p[1], 0.0);
  EXPECT_EQ(p[2], 0.0);
  EXPECT_NEAR(p[0] + p[1], 1.0, 1e-12);
  // sample_probs draws the same frequencies.
  token_probs(logits.data(), 4, 0.7, 1.0, p);
  PhiloxStream rng(9, 1);
  std::vector<int> count(4, 0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++count[sample_probs(p, rng)];
  for (int v = 0; v < 4; ++v)
    EXPECT_NEAR(count[v] / static_cast<double>(n), p[v], 4 * std::sqrt(p[v] * (1 - p[v]) / n)) << v;
}

// The nucleus found on a growing sorted head equals the one of a full sort, whether it is a few
// tokens (peaked logits) or most of the vocabulary (flat ones: the head grows past 64 and 256).
TEST(Sampling, TokenProbsNucleusEqualsAFullSort) {
  std::mt19937_64 rng(3);
  for (const double spread : {8.0, 0.05}) {
    std::normal_distribution<float> normal(0.0f, static_cast<float>(spread));
    std::vector<float> logits(2048);
    for (auto& x : logits) x = normal(rng);
    for (const double top_p : {0.3, 0.9, 0.999}) {
      std::vector<double> got;
      token_probs(logits.data(), 2048, 0.7, top_p, got);
      // Reference: the whole vocabulary sorted (sample_token's way).
      const float mx = *std::max_element(logits.begin(), logits.end());
      std::vector<std::pair<double, int32_t>> w;
      double sum = 0;
      for (int32_t v = 0; v < 2048; ++v) {
        w.emplace_back(std::exp((logits[v] - mx) / 0.7), v);
        sum += w.back().first;
      }
      std::sort(w.begin(), w.end(), [](const auto& a, const auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      double cum = 0;
      size_t keep = 0;
      while (keep < w.size() && cum < top_p * sum) cum += w[keep++].first;
      std::vector<double> want(2048, 0.0);
      for (size_t k = 0; k < keep; ++k) want[w[k].second] = w[k].first / cum;
      EXPECT_EQ(got, want) << "spread " << spread << ", top_p " << top_p;
    }
  }
}

// Drafts from q checked against p come out distributed as p, whether q is close to p or not; a
// greedy p and q (one-hot) give p's token without a draw.
TEST(Sampling, SpeculativePickIsDistributedAsTheTarget) {
  const std::vector<float> target = {2.0f, 1.5f, 0.2f, -0.5f, 1.0f, 0.0f};
  const std::vector<std::vector<float>> drafts = {
      {2.1f, 1.4f, 0.3f, -0.5f, 0.9f, 0.1f},    // close to the target
      {-1.0f, 0.0f, 2.5f, 1.0f, -0.3f, 2.0f}};  // far from it
  std::vector<double> p, q;
  token_probs(target.data(), 6, 0.8, 1.0, p);
  for (size_t k = 0; k < drafts.size(); ++k) {
    token_probs(drafts[k].data(), 6, 0.8, 1.0, q);
    PhiloxStream rng(11 + k, 3);
    std::vector<int> count(6, 0);
    int kept_n = 0;
    const int n = 100000;
    for (int i = 0; i < n; ++i) {
      const int32_t d = sample_probs(q, rng);
      bool kept = false;
      ++count[speculative_pick(p, q, d, rng, &kept)];
      kept_n += kept;
    }
    for (int v = 0; v < 6; ++v)
      EXPECT_NEAR(count[v] / static_cast<double>(n), p[v], 4 * std::sqrt(p[v] * (1 - p[v]) / n))
          << "draft " << k << ", token " << v;
    // Kept as often as sum(min(p, q)) says.
    double overlap = 0;
    for (int v = 0; v < 6; ++v) overlap += std::min(p[v], q[v]);
    EXPECT_NEAR(kept_n / static_cast<double>(n), overlap, 4 * std::sqrt(overlap / n)) << k;
  }
  token_probs(target.data(), 6, 0.0, 1.0, p);
  token_probs(drafts[1].data(), 6, 0.0, 1.0, q);
  PhiloxStream rng(1, 1);
  bool kept = true;
  EXPECT_EQ(speculative_pick(p, q, 2, rng, &kept), 0);  // greedy: the target's argmax
  EXPECT_FALSE(kept);
  EXPECT_EQ(rng.offset(), 0u);                                 // no draw
  EXPECT_THROW(speculative_pick(p, q, 0, rng, &kept), Error);  // q gives the draft no mass
}

TEST(Sampling, RejectsBadSettings) {
  const std::vector<float> logits = {1.0f};
  PhiloxStream rng(1, 1);
  EXPECT_THROW(sample_token(logits.data(), 1, -1.0, 1.0, rng), Error);
  EXPECT_THROW(sample_token(logits.data(), 1, 1.0, 0.0, rng), Error);
  EXPECT_THROW(sample_token(logits.data(), 0, 1.0, 1.0, rng), Error);
}

}  // namespace
}  // namespace fp8moe
