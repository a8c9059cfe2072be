// The sampling kernels' CPU reference (src/kernels/sampling_reference.cpp) against the meaning in
// model/sampling.h (greedy = std::max_element's lowest id among the maxima; the nucleus and its
// probabilities = token_probs', compiled in from src/model/sampling.cpp since the kernels module
// sits below the model module): kept sets equal, probabilities within 1e-6; a chi-square of 20k
// draws against the distribution; speculative_check's result distributed as p; bad arguments.
// Run: test_kernels --gtest_filter='SamplingReference*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "../support/expect_invalid.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/sampling.h"
#include "fp8moe/model/sampling.h"

namespace fp8moe {
namespace {

using kernels::SampleRow;

std::vector<bf16> random_logits(int64_t vocab, float sigma, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<bf16> x(static_cast<size_t>(vocab));
  for (auto& v : x) v = to_bf16(normal(rng));
  return x;
}
std::vector<float> as_float(const std::vector<bf16>& x) {
  std::vector<float> f(x.size());
  for (size_t i = 0; i < x.size(); ++i) f[i] = to_float(x[i]);
  return f;
}
SampleRow row_params(float t, float top_p, uint64_t counter = 0) {
  SampleRow p;
  p.temperature = t;
  p.top_p = top_p;
  p.seed = 1234;
  p.stream = 7;
  p.counter = counter;
  return p;
}

TEST(SamplingReference, GreedyIsMaxElementLowestId) {
  for (int64_t vocab : {1, 7, 1000, 32000}) {
    auto x = random_logits(vocab, 2.0f, 11 + vocab);
    // Plant ties of the maximum after the first maximum's id.
    const auto f0 = as_float(x);
    const int64_t first = std::max_element(f0.begin(), f0.end()) - f0.begin();
    for (int64_t v = first + 1; v < vocab; v += 97) x[v] = x[first];
    const auto f = as_float(x);
    const int64_t want = std::max_element(f.begin(), f.end()) - f.begin();
    EXPECT_EQ(kernels::sample_row_reference(x.data(), vocab, row_params(0, 1)), want) << vocab;
    EXPECT_EQ(kernels::sample_row_reference(x.data(), vocab, row_params(0, 0.3f)), want);
  }
  // -0 and +0 are equal maxima.
  std::vector<bf16> z = {to_bf16(-1.0f), bf16{0x8000}, bf16{0x0000}};
  EXPECT_EQ(kernels::sample_row_reference(z.data(), 3, row_params(0, 1)), 1);
}

TEST(SamplingReference, NucleusIsTokenProbs) {
  int checked = 0;
  for (int64_t vocab : {50, 1000, 32000, 129280})
    for (float t : {0.7f, 1.0f, 1.3f})
      for (float top_p : {0.5f, 0.9f, 0.95f, 1.0f}) {
        if (vocab == 129280 && t != 1.0f) continue;
        const auto x = random_logits(vocab, 2.5f, static_cast<uint64_t>(vocab * 31 + t * 10));
        const auto f = as_float(x);
        std::vector<double> want, got;
        token_probs(f.data(), vocab, t, top_p, want);
        kernels::sample_row_probs_reference(x.data(), vocab, row_params(t, top_p), got);
        ASSERT_EQ(got.size(), want.size());
        int64_t diff_set = 0;
        double worst = 0;
        for (int64_t v = 0; v < vocab; ++v) {
          diff_set += (want[v] > 0) != (got[v] > 0);
          worst = std::max(worst, std::abs(want[v] - got[v]));
        }
        EXPECT_EQ(diff_set, 0) << "vocab " << vocab << " T " << t << " top_p " << top_p;
        EXPECT_LE(worst, 1e-6) << "vocab " << vocab << " T " << t << " top_p " << top_p;
        ++checked;
      }
  EXPECT_GT(checked, 30);
}

TEST(SamplingReference, TiesKeepLowestIds) {
  // 1000 equal logits: top_p 0.5 keeps exactly the 500 lowest ids (as token_probs).
  std::vector<bf16> x(1000, to_bf16(0.25f));
  std::vector<double> got, want;
  kernels::sample_row_probs_reference(x.data(), 1000, row_params(1, 0.5f), got);
  const auto f = as_float(x);
  token_probs(f.data(), 1000, 1.0, 0.5, want);
  for (int v = 0; v < 1000; ++v) {
    EXPECT_EQ(got[v] > 0, v < 500) << v;
    EXPECT_NEAR(got[v], want[v], 1e-6) << v;
  }
  for (uint64_t c = 0; c < 200; ++c) {
    const int32_t tok = kernels::sample_row_reference(x.data(), 1000, row_params(1, 0.5f, c));
    EXPECT_TRUE(tok >= 0 && tok < 500) << tok;
  }
}

double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& probs, int64_t n,
                  int* dof) {
  double chi = 0;
  *dof = -1;
  for (size_t v = 0; v < probs.size(); ++v) {
    if (probs[v] <= 0) {
      EXPECT_EQ(counts[v], 0) << "token " << v << " outside the distribution";
      continue;
    }
    const double e = probs[v] * static_cast<double>(n);
    chi += (static_cast<double>(counts[v]) - e) * (static_cast<double>(counts[v]) - e) / e;
    ++*dof;
  }
  return chi;
}

TEST(SamplingReference, ChiSquareOfDraws) {
  constexpr int64_t kVocab = 16, kDraws = 20000;
  const auto x = random_logits(kVocab, 1.0f, 5);
  const auto f = as_float(x);
  for (float top_p : {1.0f, 0.8f}) {
    std::vector<double> probs;
    token_probs(f.data(), kVocab, 1.0, top_p, probs);
    std::vector<int64_t> counts(kVocab, 0);
    for (int64_t i = 0; i < kDraws; ++i)
      ++counts[kernels::sample_row_reference(x.data(), kVocab,
                                             row_params(1, top_p, static_cast<uint64_t>(i)))];
    int dof = 0;
    const double chi = chi_square(counts, probs, kDraws, &dof);
    // 99.9th percentile of chi-square: 37.7 at 15 degrees of freedom, less at fewer.
    EXPECT_LT(chi, 40.0) << "top_p " << top_p << " dof " << dof;
  }
}

TEST(SamplingReference, SpeculativeResultIsDistributedAsP) {
  constexpr int64_t kVocab = 12, kDraws = 20000;
  const auto p = random_logits(kVocab, 1.0f, 21), q = random_logits(kVocab, 1.0f, 22);
  const auto b = random_logits(kVocab, 1.0f, 23);
  for (float top_p : {1.0f, 0.9f}) {
    std::vector<double> pp;
    kernels::sample_row_probs_reference(p.data(), kVocab, row_params(1, top_p), pp);
    std::vector<int64_t> counts(kVocab, 0);
    int64_t kept = 0;
    for (int64_t i = 0; i < kDraws; ++i) {
      const SampleRow prm = row_params(1, top_p, static_cast<uint64_t>(4 * i));
      const int32_t draft = kernels::sample_row_reference(q.data(), kVocab, prm);
      SampleRow check = prm;
      check.counter += 1;
      const auto r = kernels::speculative_check_row_reference(p.data(), q.data(), b.data(), kVocab,
                                                              draft, check);
      ASSERT_GE(r.token, 0);
      ++counts[r.token];
      kept += r.kept;
      EXPECT_EQ(r.kept != 0, r.bonus >= 0);
      if (r.kept) {
        EXPECT_EQ(r.token, draft);
      }
    }
    int dof = 0;
    const double chi = chi_square(counts, pp, kDraws, &dof);
    EXPECT_LT(chi, 36.0) << "top_p " << top_p << " dof " << dof;
    EXPECT_GT(kept, 0);
    EXPECT_LT(kept, kDraws);
  }
  // Greedy: kept iff the draft is p's argmax; the bonus is the bonus row's argmax.
  const SampleRow g = row_params(0, 1);
  const int32_t am = kernels::sample_row_reference(p.data(), kVocab, g);
  const int32_t bm = kernels::sample_row_reference(b.data(), kVocab, g);
  auto r = kernels::speculative_check_row_reference(p.data(), q.data(), b.data(), kVocab, am, g);
  EXPECT_EQ(r.token, am);
  EXPECT_EQ(r.kept, 1);
  EXPECT_EQ(r.bonus, bm);
  r = kernels::speculative_check_row_reference(p.data(), q.data(), b.data(), kVocab,
                                               (am + 1) % kVocab, g);
  EXPECT_EQ(r.token, am);
  EXPECT_EQ(r.kept, 0);
  EXPECT_EQ(r.bonus, -1);
}

TEST(SamplingReference, NonFiniteLogits) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float t : {0.0f, 1.0f}) {
    auto x = random_logits(100, 1.0f, 3);
    x[40] = to_bf16(nan);
    EXPECT_EQ(kernels::sample_row_reference(x.data(), 100, row_params(t, 0.9f)),
              kernels::kSampleBadLogits);
    x[40] = to_bf16(inf);
    EXPECT_EQ(kernels::sample_row_reference(x.data(), 100, row_params(t, 0.9f)),
              kernels::kSampleBadLogits);
    std::vector<bf16> all_masked(10, to_bf16(-inf));
    EXPECT_EQ(kernels::sample_row_reference(all_masked.data(), 10, row_params(t, 0.9f)),
              kernels::kSampleBadLogits);
  }
  // -inf masks a token: never drawn.
  auto x = random_logits(8, 0.1f, 4);
  for (int v = 0; v < 8; v += 2) x[v] = to_bf16(-inf);
  for (uint64_t c = 0; c < 500; ++c)
    EXPECT_EQ(kernels::sample_row_reference(x.data(), 8, row_params(5.0f, 1.0f, c)) % 2, 1);
}

TEST(SamplingReference, BadArgumentsThrow) {
  const auto x = random_logits(10, 1.0f, 1);
  int32_t tok = 0;
  SampleRow ok = row_params(1, 0.9f);
  test::expect_invalid([&] { kernels::sample_rows_reference(x.data(), 10, -1, 10, &ok, &tok); },
                       "rows=-1");
  test::expect_invalid([&] { kernels::sample_row_reference(x.data(), 0, ok); }, "vocab=0");
  test::expect_invalid([&] { kernels::sample_row_reference(x.data(), -3, ok); }, "vocab=-3");
  test::expect_invalid([&] { kernels::sample_row_reference(x.data(), 10, row_params(-1, 0.9f)); },
                       "temperature=-1");
  test::expect_invalid(
      [&] {
        kernels::sample_row_reference(x.data(), 10,
                                      row_params(std::numeric_limits<float>::quiet_NaN(), 1));
      },
      "temperature=");
  for (float top_p : {0.0f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()})
    test::expect_invalid([&] { kernels::sample_row_reference(x.data(), 10, row_params(1, top_p)); },
                         "top_p=");
  test::expect_invalid(
      [&] { kernels::speculative_check_row_reference(x.data(), x.data(), x.data(), 10, 10, ok); },
      "draft=10");
  test::expect_invalid([&] { kernels::sample_rows_reference(x.data(), 5, 1, 10, &ok, &tok); },
                       "ld=5");
}

}  // namespace
}  // namespace fp8moe
