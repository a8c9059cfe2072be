// Tests of kernels::mla_decode_reference (kernels/mla_decode.h) against a dense computation in
// double: keys gathered per sequence, causal masking among several new tokens, rows that see no
// key (out 0, lse -inf), and the page table's indirection with shuffled pages. Rows the contract
// says are never read hold NaN. `test_kernels --gtest_filter='MlaDecodeReference*'`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/kernels/mla_decode.h"

namespace fp8moe::kernels {
namespace {

struct Case {
  MlaDecodeShape shape;
  std::vector<int32_t> seq_lens;
};

void check_against_dense(const Case& c, uint64_t seed) {
  const MlaDecodeShape& s = c.shape;
  const int64_t D = s.key_dim(), L = s.latent_dim, rows = s.rows();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Each sequence's keys, dense [len, D]; then scattered into pages in a shuffled order.
  std::vector<std::vector<float>> keys(static_cast<size_t>(s.batch));
  int64_t pages_used = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    keys[b].resize(static_cast<size_t>(c.seq_lens[b] * D));
    for (size_t i = 0; i < keys[b].size(); ++i) keys[b][i] = philox_normal(seed, 1 + b, i);
    pages_used += (c.seq_lens[b] + s.page_tokens - 1) / s.page_tokens;
  }
  const int64_t num_pages = pages_used + 2;  // two pages no sequence owns
  std::vector<int32_t> order(static_cast<size_t>(num_pages));
  for (int64_t i = 0; i < num_pages; ++i) order[i] = static_cast<int32_t>(i);
  for (int64_t i = num_pages - 1; i > 0; --i)  // Fisher-Yates with Philox
    std::swap(order[i], order[philox_u32(seed, 99, i) % (i + 1)]);
  std::vector<float> cache(static_cast<size_t>(num_pages * s.page_tokens * D), nan);
  std::vector<int32_t> table(static_cast<size_t>(s.batch * s.max_pages), -1);
  int64_t next = 0;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t t = 0; t < c.seq_lens[b]; ++t) {
      int32_t& page = table[b * s.max_pages + t / s.page_tokens];
      if (t % s.page_tokens == 0) page = order[next++];
      std::copy_n(keys[b].data() + t * D, D,
                  cache.data() + (page * s.page_tokens + t % s.page_tokens) * D);
    }
  std::vector<float> q(static_cast<size_t>(s.batch * rows * D));
  for (size_t i = 0; i < q.size(); ++i) q[i] = philox_normal(seed, 0, i);
  std::vector<float> out(static_cast<size_t>(s.batch * rows * L), nan),
      lse(static_cast<size_t>(s.batch * rows), nan);
  mla_decode_reference(s, q.data(), cache.data(), table.data(), c.seq_lens.data(), out.data(),
                       lse.data());
  // Dense: query i of sequence b sees keys [0, len - queries + i].
  int64_t empty_rows = 0;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r / s.heads, len = c.seq_lens[b];
      const int64_t visible = std::max<int64_t>(0, len - s.queries + i + 1);
      const float* qr = q.data() + (b * rows + r) * D;
      const float* o = out.data() + (b * rows + r) * L;
      const float got_lse = lse[b * rows + r];
      if (visible == 0) {
        ++empty_rows;
        EXPECT_TRUE(std::isinf(got_lse) && got_lse < 0) << "b " << b << " row " << r;
        for (int64_t d = 0; d < L; ++d) ASSERT_EQ(o[d], 0.0f) << "b " << b << " row " << r;
        continue;
      }
      std::vector<double> score(static_cast<size_t>(visible));
      double mx = -INFINITY;
      for (int64_t t = 0; t < visible; ++t) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(qr[d]) * keys[b][t * D + d];
        score[t] = dot * s.softmax_scale;
        mx = std::max(mx, score[t]);
      }
      double sum = 0;
      for (double v : score) sum += std::exp(v - mx);
      EXPECT_NEAR(got_lse, mx + std::log(sum), 1e-5 * std::max(1.0, std::fabs(mx)))
          << "b " << b << " row " << r;
      for (int64_t d = 0; d < L; ++d) {
        double want = 0;
        for (int64_t t = 0; t < visible; ++t)
          want += std::exp(score[t] - mx) / sum * keys[b][t * D + d];
        ASSERT_NEAR(o[d], want, 2e-5) << "b " << b << " row " << r << " col " << d;
      }
    }
  int64_t want_empty = 0;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t i = 0; i < s.queries; ++i)
      want_empty += c.seq_lens[b] - s.queries + i + 1 <= 0 ? s.heads : 0;
  EXPECT_EQ(empty_rows, want_empty);
}

MlaDecodeShape small_shape(int64_t batch, int64_t queries, int64_t page_tokens, int64_t max_pages) {
  MlaDecodeShape s;
  s.batch = batch;
  s.queries = queries;
  s.heads = 3;
  s.latent_dim = 16;
  s.rope_dim = 8;
  s.page_tokens = page_tokens;
  s.max_pages = max_pages;
  s.softmax_scale = 0.3f;
  return s;
}

TEST(MlaDecodeReference, OneQueryEqualsDenseAttentionOverShuffledPages) {
  check_against_dense({small_shape(3, 1, 4, 5), {17, 1, 8}}, 11);
}

TEST(MlaDecodeReference, SeveralQueriesAreCausalAmongTheNewTokens) {
  // queries 4: sequence 1 (2 keys) has two rows that see nothing, sequence 2 (0 keys) four.
  check_against_dense({small_shape(4, 4, 4, 6), {21, 2, 0, 4}}, 12);
  check_against_dense({small_shape(2, 3, 1, 9), {9, 3}}, 13);  // one token a page
}

TEST(MlaDecodeReference, RejectsBadShapesAndLengths) {
  MlaDecodeShape s = small_shape(1, 0, 4, 2);
  EXPECT_THROW(mla_decode_check_shape("test", s), Error);
  s = small_shape(1, 1, 4, 2);
  s.softmax_scale = 0;
  EXPECT_THROW(mla_decode_check_shape("test", s), Error);
  s = small_shape(1, 1, 4, 2);
  std::vector<float> q(static_cast<size_t>(s.rows() * s.key_dim()), 0.0f),
      cache(static_cast<size_t>(2 * 4 * s.key_dim()), 0.0f), out(s.rows() * s.latent_dim),
      lse(s.rows());
  const std::vector<int32_t> table = {0, 1};
  const int32_t too_long = 9;  // capacity 2 x 4
  EXPECT_THROW(mla_decode_reference(s, q.data(), cache.data(), table.data(), &too_long, out.data(),
                                    lse.data()),
               Error);
}

}  // namespace
}  // namespace fp8moe::kernels
