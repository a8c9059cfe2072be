// Dispatch layout on hand-made cases: counts, 128-aligned grouped blocks with -1 padding, the
// masked layout, the inverse map, and permute/combine round trips.
#include "fp8moe/moe/dispatch_layout.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"

namespace fp8moe {
namespace {

// 4 tokens, top-2, 8 experts on 2 ranks (experts 0-3 on rank 0, 4-7 on rank 1).
const std::vector<int32_t> kIds = {1,  5,   // token 0: both ranks
                                   1,  2,   // token 1: rank 0 twice
                                   6,  7,   // token 2: rank 1 twice
                                   -1, 1};  // token 3: one dropped slot

TEST(DispatchLayout, Counts) {
  const DispatchCounts c = dispatch_counts(kIds.data(), 4, 2, {8, 2});
  EXPECT_EQ(c.tokens_per_expert, (std::vector<int32_t>{0, 3, 1, 0, 0, 1, 1, 1}));
  // A token goes to a rank once, however many of its experts live there.
  EXPECT_EQ(c.tokens_per_rank, (std::vector<int32_t>{3, 2}));
  EXPECT_EQ(c.token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 1, 1, 0}));
}

TEST(DispatchLayout, GroupedBlocksAreAlignedAndPadded) {
  const GroupedLayout g = grouped_layout(kIds.data(), 4, 2, ExpertSharding{8, 2}, 0);
  EXPECT_EQ(g.expert_begin, 0);
  EXPECT_EQ(g.expert_end, 4);
  EXPECT_EQ(g.expert_counts, (std::vector<int32_t>{0, 3, 1, 0}));
  // Expert 0 is empty (no block), expert 1 takes rows [0, 128), expert 2 [128, 256).
  EXPECT_EQ(g.expert_offsets, (std::vector<int32_t>{0, 0, 128, 256, 256}));
  ASSERT_EQ(g.num_rows(), 256);
  // Expert 1's rows in slot order: slots 0 (t0), 2 (t1), 7 (t3); then padding.
  EXPECT_EQ(g.row_src[0], 0);
  EXPECT_EQ(g.row_src[1], 2);
  EXPECT_EQ(g.row_src[2], 7);
  EXPECT_EQ(g.row_src[3], -1);
  EXPECT_EQ(g.m_indices[0], 1);
  EXPECT_EQ(g.m_indices[2], 1);
  EXPECT_EQ(g.m_indices[3], -1);
  EXPECT_EQ(g.m_indices[127], -1);
  EXPECT_EQ(g.m_indices[128], 2);
  EXPECT_EQ(g.row_src[128], 3);
  EXPECT_EQ(g.m_indices[129], -1);
  EXPECT_EQ(g.src_to_row, (std::vector<int32_t>{0, -1, 1, 128, -1, -1, -1, 2}));

  const GroupedLayout g1 = grouped_layout(kIds.data(), 4, 2, ExpertSharding{8, 2}, 1);
  EXPECT_EQ(g1.expert_offsets, (std::vector<int32_t>{0, 0, 128, 256, 384}));
  EXPECT_EQ(g1.src_to_row, (std::vector<int32_t>{-1, 0, -1, -1, 128, 256, -1, -1}));
  // An alignment of 1 packs rows densely.
  const GroupedLayout dense = grouped_layout(kIds.data(), 4, 2, 0, 8, 1);
  EXPECT_EQ(dense.num_rows(), 7);
  EXPECT_EQ(dense.m_indices, (std::vector<int32_t>{1, 1, 1, 2, 5, 6, 7}));
}

TEST(DispatchLayout, InvariantsOnRandomSkewedInput) {
  const int64_t T = 3000;
  const int K = 8, E = 256;
  PhiloxStream rng(5, 0);
  std::vector<int32_t> ids(T * K);
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < K; ++k) {
      int32_t e;
      bool fresh;
      do {
        e = std::min<int32_t>(E - 1, static_cast<int32_t>(std::pow(rng.uniform(), 3.0f) * E));
        fresh = true;
        for (int j = 0; j < k; ++j) fresh &= ids[t * K + j] != e;
      } while (!fresh);
      ids[t * K + k] = e;
    }
  for (int rank = 0; rank < 8; ++rank) {
    const GroupedLayout g = grouped_layout(ids.data(), T, K, ExpertSharding{E, 8}, rank);
    EXPECT_LE(g.num_rows(), grouped_layout_max_rows(T, K, g.num_local_experts()));
    for (int e = 0; e < g.num_local_experts(); ++e) {
      EXPECT_EQ(g.expert_offsets[e] % 128, 0);
      for (int32_t row = g.expert_offsets[e]; row < g.expert_offsets[e + 1]; ++row) {
        const bool valid = row < g.expert_offsets[e] + g.expert_counts[e];
        EXPECT_EQ(g.m_indices[row], valid ? e : -1);
        if (!valid) continue;
        EXPECT_EQ(ids[g.row_src[row]], g.expert_begin + e);
        EXPECT_EQ(g.src_to_row[g.row_src[row]], row);
        if (row > g.expert_offsets[e]) {
          EXPECT_LT(g.row_src[row - 1], g.row_src[row]);
        }
      }
    }
    int64_t mapped = 0;
    for (int32_t r : g.src_to_row) mapped += r >= 0;
    EXPECT_EQ(mapped, std::accumulate(g.expert_counts.begin(), g.expert_counts.end(), int64_t{0}));
  }
}

TEST(DispatchLayout, MaskedLayout) {
  const MaskedLayout m = masked_layout(kIds.data(), 4, 2, 0, 4, 3);
  EXPECT_EQ(m.masked_m, (std::vector<int32_t>{0, 3, 1, 0}));
  EXPECT_EQ(m.row_src, (std::vector<int32_t>{-1, -1, -1, 0, 2, 7, 3, -1, -1, -1, -1, -1}));
  EXPECT_EQ(m.src_to_row, (std::vector<int32_t>{3, -1, 4, 6, -1, -1, -1, 5}));
  EXPECT_THROW(masked_layout(kIds.data(), 4, 2, 0, 4, 2), Error);  // expert 1 has 3 slots
}

TEST(DispatchLayout, PermuteThenCombineIsTheWeightedSum) {
  const int64_t T = 4, H = 3;
  std::vector<float> x(T * H);
  std::iota(x.begin(), x.end(), 1.0f);
  const std::vector<float> w = {0.5f, 0.25f, 1.0f, 2.0f, 3.0f, 4.0f, 9.0f, 0.125f};
  for (int rank = 0; rank < 2; ++rank) {
    const GroupedLayout g = grouped_layout(kIds.data(), T, 2, ExpertSharding{8, 2}, rank);
    const std::vector<float> rows = permute_rows(g.row_src, 2, x.data(), H);
    // The "expert" is the identity: combine gives sum of local weights times x.
    const std::vector<float> out = combine_rows(g.src_to_row, T, 2, w.data(), rows.data(), H);
    for (int64_t t = 0; t < T; ++t) {
      float wsum = 0;
      for (int k = 0; k < 2; ++k) {
        const int32_t e = kIds[t * 2 + k];
        if (e >= 0 && e / 4 == rank) wsum += w[t * 2 + k];
      }
      for (int64_t h = 0; h < H; ++h) EXPECT_FLOAT_EQ(out[t * H + h], wsum * x[t * H + h]);
    }
  }
}

TEST(DispatchLayout, RejectsBadIds) {
  const std::vector<int32_t> bad = {0, 8};
  EXPECT_THROW(dispatch_counts(bad.data(), 1, 2, {8, 2}), Error);
  EXPECT_THROW(dispatch_counts(kIds.data(), 4, 2, {8, 3}), Error);
  EXPECT_THROW(grouped_layout(kIds.data(), 4, 2, ExpertSharding{8, 2}, 2), Error);
  const std::vector<int32_t> neg = {-2, 1};
  EXPECT_THROW(grouped_layout(neg.data(), 1, 2, 0, 8), Error);
}

}  // namespace
}  // namespace fp8moe
