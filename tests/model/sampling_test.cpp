// sample_token (model/sampling.h): greedy picks the first maximum; the nucleus never leaves the
// top_p mass; draws follow the softmax (a chi-square-free check: frequencies within 3 sigma).
// Run: test_model --gtest_filter='Sampling*'
#include <gtest/gtest.h>

#include <cmath>
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

TEST(Sampling, RejectsBadSettings) {
  const std::vector<float> logits = {1.0f};
  PhiloxStream rng(1, 1);
  EXPECT_THROW(sample_token(logits.data(), 1, -1.0, 1.0, rng), Error);
  EXPECT_THROW(sample_token(logits.data(), 1, 1.0, 0.0, rng), Error);
  EXPECT_THROW(sample_token(logits.data(), 0, 1.0, 1.0, rng), Error);
}

}  // namespace
}  // namespace fp8moe
