// Token sampling on the GPU (src/kernels/sampling.cu) against its CPU reference
// (src/kernels/sampling_reference.cpp), which computes the same float operations in the same
// order: tokens must be EQUAL (mismatch count 0), speculative token / kept / bonus too. Fresh
// random BF16 logits (per-row scale 0.5 .. 6, some rows peaked like a language model's), vocab
// 129280 / 32000 / 1000, rows 1 .. 130, mixed per-row parameters (greedy rows, T 0.7 .. 1.3,
// top_p 0.5 .. 1), padded and odd row strides (the scalar-load path), outputs poisoned first; a
// row of all-equal logits, a row with one huge logit, NaN / +inf rows and bad parameters.
// Run: test_kernels_gpu --gtest_filter='Sampling*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/sampling.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::SampleRow;
using test::DeviceBuffer;

struct Batch {
  int64_t rows = 0, vocab = 0, ld = 0;
  std::vector<bf16> logits;
  std::vector<SampleRow> params;
};

// Rows of random logits; row kinds: 0 normal, 1 peaked (a few large logits), 2 all equal, 3 one
// huge logit, by `special` for the first rows.
Batch make_batch(int64_t rows, int64_t vocab, int64_t ld, uint64_t seed, bool special) {
  Batch b{rows, vocab, ld, {}, {}};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  b.logits.assign(static_cast<size_t>(rows * ld), to_bf16(std::nanf("")));  // padding: NaN
  for (int64_t r = 0; r < rows; ++r) {
    bf16* row = b.logits.data() + r * ld;
    const float scale = 0.5f + 5.5f * uni(rng);
    const int kind = special && r < 2 ? static_cast<int>(r + 2) : (r % 3 == 1 ? 1 : 0);
    for (int64_t v = 0; v < vocab; ++v) {
      float x = scale * normal(rng);
      if (kind == 1 && uni(rng) < 0.001f) x += 15.0f;
      if (kind == 2) x = 1.5f;
      row[v] = to_bf16(x);
    }
    if (kind == 3) row[rng() % vocab] = to_bf16(3.0e4f);
    SampleRow p;
    p.seed = rng();
    p.stream = static_cast<uint64_t>(r);
    p.counter = rng() % 1000;
    if (r % 4 == 3) {
      p.temperature = 0;
      p.top_p = 1;
    } else {
      p.temperature = 0.7f + 0.6f * uni(rng);
      p.top_p = r % 5 == 0 ? 1.0f : 0.5f + 0.5f * uni(rng);
    }
    b.params.push_back(p);
  }
  return b;
}

int64_t run_sample(const Batch& b, const char* name) {
  std::vector<int32_t> want(static_cast<size_t>(b.rows));
  kernels::sample_rows_reference(b.logits.data(), b.ld, b.rows, b.vocab, b.params.data(),
                                 want.data());
  DeviceBuffer<bf16> d_logits(b.logits);
  DeviceBuffer<SampleRow> d_params(b.params);
  DeviceBuffer<int32_t> d_tokens(static_cast<size_t>(b.rows));
  d_tokens.poison(0x7F);
  kernels::sample_rows(d_logits.get(), b.ld, b.rows, b.vocab, d_params.get(), d_tokens.get(),
                       nullptr);
  const auto got = d_tokens.download();
  int64_t mismatches = 0, greedy = 0;
  for (int64_t r = 0; r < b.rows; ++r) {
    greedy += b.params[r].temperature == 0;
    if (got[r] != want[r]) {
      if (mismatches < 5)
        ADD_FAILURE() << name << " row " << r << ": gpu " << got[r] << " reference " << want[r]
                      << " (T " << b.params[r].temperature << " top_p " << b.params[r].top_p << ")";
      ++mismatches;
    }
  }
  std::printf(
      "[ sampling ] %-28s rows %4lld vocab %6lld ld %6lld (greedy %3lld): mismatches %lld\n", name,
      static_cast<long long>(b.rows), static_cast<long long>(b.vocab), static_cast<long long>(b.ld),
      static_cast<long long>(greedy), static_cast<long long>(mismatches));
  return mismatches;
}

TEST(SamplingGpu, TokensEqualReference) {
  struct Case {
    int64_t rows, vocab, ld;
  };
  const Case cases[] = {{1, 129280, 129280}, {37, 129280, 129280}, {130, 129280, 129280},
                        {64, 32000, 32000},  {130, 32000, 32008},  {9, 1000, 1000},
                        {130, 1000, 1003},   {5, 129280, 129283}};
  uint64_t seed = 100;
  for (const Case& c : cases) {
    const Batch b = make_batch(c.rows, c.vocab, c.ld, ++seed, c.rows > 2);
    EXPECT_EQ(run_sample(b, "random"), 0);
  }
}

TEST(SamplingGpu, RowIndexPicksRows) {
  // 40 rows drawn from a buffer of 80 (GeneratorGpu's draft rows 2i + kept_i), some twice.
  const Batch b = make_batch(80, 32000, 32000, 4321, false);
  std::vector<int32_t> index(40);
  std::vector<SampleRow> params(40);
  for (int i = 0; i < 40; ++i) {
    index[i] = i % 9 == 8 ? index[i - 1] : 2 * i + (i * 7 % 3 == 0 ? 1 : 0);
    params[i] = b.params[(i * 13) % 80];
  }
  std::vector<int32_t> want(40);
  kernels::sample_rows_reference(b.logits.data(), b.ld, 40, b.vocab, params.data(), want.data(),
                                 index.data());
  DeviceBuffer<bf16> d_logits(b.logits);
  DeviceBuffer<SampleRow> d_params(params);
  DeviceBuffer<int32_t> d_index(index), d_tokens(40);
  d_tokens.poison(0x7F);
  kernels::sample_rows(d_logits.get(), b.ld, 40, b.vocab, d_params.get(), d_tokens.get(), nullptr,
                       d_index.get());
  const auto got = d_tokens.download();
  int64_t mismatches = 0;
  for (int i = 0; i < 40; ++i) mismatches += got[i] != want[i];
  std::printf("[ sampling ] row_index 40 of 80 rows vocab 32000: mismatches %lld\n",
              static_cast<long long>(mismatches));
  EXPECT_EQ(mismatches, 0);
}

TEST(SamplingGpu, AllEqualAndHugeLogit) {
  for (int64_t vocab : {129280, 1000}) {
    Batch b = make_batch(4, vocab, vocab, 7 + vocab, true);  // row 0 all equal, row 1 one huge
    for (auto& p : b.params) {
      p.temperature = 1.0f;
      p.top_p = 0.6f;
    }
    EXPECT_EQ(run_sample(b, "all-equal / huge, top_p 0.6"), 0);
    for (auto& p : b.params) p.top_p = 1.0f;
    EXPECT_EQ(run_sample(b, "all-equal / huge, top_p 1"), 0);
  }
}

TEST(SamplingGpu, BadRowsAndParams) {
  Batch b = make_batch(6, 1000, 1000, 99, false);
  b.logits[1 * 1000 + 17] = to_bf16(std::nanf(""));                          // NaN
  b.logits[2 * 1000 + 5] = to_bf16(std::numeric_limits<float>::infinity());  // +inf
  b.params[3].temperature = -1;                                              // bad T
  b.params[4].top_p = 0;                                                     // bad p
  b.params[5].top_p = std::nanf("");
  DeviceBuffer<bf16> d_logits(b.logits);
  DeviceBuffer<SampleRow> d_params(b.params);
  DeviceBuffer<int32_t> d_tokens(6);
  d_tokens.poison(0x7F);
  kernels::sample_rows(d_logits.get(), 1000, 6, 1000, d_params.get(), d_tokens.get(), nullptr);
  const auto got = d_tokens.download();
  EXPECT_GE(got[0], 0);
  EXPECT_EQ(got[1], kernels::kSampleBadLogits);
  EXPECT_EQ(got[2], kernels::kSampleBadLogits);
  EXPECT_EQ(got[3], kernels::kSampleBadParams);
  EXPECT_EQ(got[4], kernels::kSampleBadParams);
  EXPECT_EQ(got[5], kernels::kSampleBadParams);
  EXPECT_THROW(
      kernels::sample_rows(d_logits.get(), 1000, -1, 1000, d_params.get(), d_tokens.get(), nullptr),
      Error);
  EXPECT_THROW(
      kernels::sample_rows(d_logits.get(), 1000, 1, 0, d_params.get(), d_tokens.get(), nullptr),
      Error);
}

// Requests: target rows 2i (p) and 2i + 1 (bonus), draft row i (q), the draft drawn from q.
// indexed: the draft rows live at 2i + (i % 2) of a buffer of 2 x requests rows (draft_row_index).
int64_t run_speculative(int64_t requests, int64_t vocab, uint64_t seed, bool indexed = false) {
  Batch target = make_batch(2 * requests, vocab, vocab, seed, false);
  Batch draft = make_batch(requests, vocab, vocab, seed + 1, false);
  std::vector<SampleRow> params(static_cast<size_t>(requests));
  std::vector<int32_t> draft_tokens(static_cast<size_t>(requests));
  for (int64_t i = 0; i < requests; ++i) {
    params[i] = target.params[2 * i];
    // The draft logits near the target's (a good draft) for half of the requests.
    if (i % 2 == 0)
      for (int64_t v = 0; v < vocab; ++v)
        draft.logits[i * vocab + v] =
            to_bf16(to_float(target.logits[2 * i * vocab + v]) + (v % 7 == 0 ? 0.5f : 0.0f));
    SampleRow dp = params[i];
    dp.counter += 1000;
    draft_tokens[i] = kernels::sample_row_reference(draft.logits.data() + i * vocab, vocab, dp);
    if (i % 5 == 4) draft_tokens[i] = static_cast<int32_t>((i * 7919) % vocab);  // unlikely draft
  }
  std::vector<kernels::SpecResult> want(static_cast<size_t>(requests));
  for (int64_t i = 0; i < requests; ++i)
    want[i] = kernels::speculative_check_row_reference(
        target.logits.data() + 2 * i * vocab, draft.logits.data() + i * vocab,
        target.logits.data() + (2 * i + 1) * vocab, vocab, draft_tokens[i], params[i]);
  std::vector<bf16> draft_buffer = draft.logits;
  std::vector<int32_t> draft_index(static_cast<size_t>(requests));
  if (indexed) {  // row i moves to 2i + (i % 2); the other rows are NaN (never read)
    draft_buffer.assign(static_cast<size_t>(2 * requests * vocab), to_bf16(std::nanf("")));
    for (int64_t i = 0; i < requests; ++i) {
      draft_index[i] = static_cast<int32_t>(2 * i + i % 2);
      std::copy(draft.logits.begin() + i * vocab, draft.logits.begin() + (i + 1) * vocab,
                draft_buffer.begin() + draft_index[i] * vocab);
    }
  }
  DeviceBuffer<int32_t> d_draft_index(draft_index);
  DeviceBuffer<bf16> d_target(target.logits), d_draft(draft_buffer);
  DeviceBuffer<SampleRow> d_params(params);
  DeviceBuffer<int32_t> d_draft_tokens(draft_tokens);
  DeviceBuffer<int32_t> d_tok(static_cast<size_t>(requests)), d_kept(static_cast<size_t>(requests)),
      d_bonus(static_cast<size_t>(requests));
  d_tok.poison(0x7F);
  d_kept.poison(0x7F);
  d_bonus.poison(0x7F);
  kernels::speculative_check_rows(d_target.get(), vocab, d_draft.get(), vocab, d_draft_tokens.get(),
                                  requests, vocab, d_params.get(), d_tok.get(), d_kept.get(),
                                  d_bonus.get(), nullptr, indexed ? d_draft_index.get() : nullptr);
  const auto tok = d_tok.download(), kept = d_kept.download(), bonus = d_bonus.download();
  int64_t mismatches = 0, kept_count = 0;
  for (int64_t i = 0; i < requests; ++i) {
    kept_count += want[i].kept;
    if (tok[i] != want[i].token || kept[i] != want[i].kept || bonus[i] != want[i].bonus) {
      if (mismatches < 5)
        ADD_FAILURE() << "request " << i << ": gpu (" << tok[i] << ", " << kept[i] << ", "
                      << bonus[i] << ") reference (" << want[i].token << ", " << want[i].kept
                      << ", " << want[i].bonus << ")";
      ++mismatches;
    }
  }
  std::printf("[ sampling ] speculative requests %4lld vocab %6lld%s: kept %lld, mismatches %lld\n",
              static_cast<long long>(requests), static_cast<long long>(vocab),
              indexed ? " (draft rows indexed)" : "", static_cast<long long>(kept_count),
              static_cast<long long>(mismatches));
  return mismatches;
}

TEST(SamplingGpu, SpeculativeEqualsReference) {
  EXPECT_EQ(run_speculative(1, 129280, 500), 0);
  EXPECT_EQ(run_speculative(40, 129280, 600), 0);
  EXPECT_EQ(run_speculative(65, 32000, 700), 0);
  EXPECT_EQ(run_speculative(130, 1000, 800), 0);
  EXPECT_EQ(run_speculative(33, 129280, 900, true), 0);
}

}  // namespace
}  // namespace fp8moe
