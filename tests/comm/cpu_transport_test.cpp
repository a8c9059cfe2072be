// Expert-parallel dispatch/combine on the CPU: the reference's meaning checked directly
// (payload origin, FP8 equal to fp8::quantize, grouped layout equal to moe::grouped_layout,
// identity experts), then the CPU-threads back end (one and two stages) against the reference
// bit for bit, and its failure modes (timeouts naming rank/peer/counter, overflow, bad input).
#include "fp8moe/comm/cpu_transport.h"

#include <gtest/gtest.h>

#include "ep_test_util.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/moe/dispatch_layout.h"

namespace fp8moe::comm {
namespace {

using testing::batches_of;
using testing::expect_same_dispatch;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;
using testing::run_ranks;

using testing::config;

// ---- the reference's meaning ----

TEST(EpReference, PayloadsCarryTheirOriginAndLayoutMatchesMoe) {
  for (Payload p : {Payload::kBF16, Payload::kFP8}) {
    const EpConfig cfg = config(4, 0, 16, 4, 256, 40, p);
    const auto data = make_inputs(cfg, {40, 17, 0, 33}, Routing::kRandom, 7);
    const auto res = dispatch_reference(cfg, batches_of(data));
    for (int d = 0; d < cfg.num_ranks; ++d) {
      const RecvTokens& r = res[d].recv;
      std::vector<int32_t> ids;  // concatenated global ids of what d received
      for (int s = 0; s < cfg.num_ranks; ++s) {
        int64_t expect = 0;
        for (int64_t t = 0; t < data[s].tokens; ++t) {
          bool to_d = false;
          for (int k = 0; k < cfg.top_k; ++k) to_d |= data[s].idx[t * cfg.top_k + k] / 4 == d;
          if (!to_d) continue;
          const int64_t at = s * cfg.max_tokens_per_rank + expect++;
          ASSERT_EQ(r.src_token[at], t);
          for (int k = 0; k < cfg.top_k; ++k) ids.push_back(data[s].idx[t * cfg.top_k + k]);
          const uint16_t* src = &data[s].x[t * cfg.hidden];
          if (p == Payload::kBF16) {
            const uint16_t* row = &r.x_bf16[at * cfg.hidden];
            EXPECT_EQ(bf16_bits_to_float(row[0]), s);
            EXPECT_EQ(bf16_bits_to_float(row[1]) + 128 * bf16_bits_to_float(row[2]), t);
            EXPECT_TRUE(std::equal(src, src + cfg.hidden, row));
          } else {
            std::vector<float> xf(cfg.hidden);
            for (int64_t h = 0; h < cfg.hidden; ++h) xf[h] = bf16_bits_to_float(src[h]);
            const QuantizedMatrix q =
                quantize(xf.data(), 1, cfg.hidden, cfg.hidden, ScaleGranularity::k1x128);
            ASSERT_TRUE(std::equal(q.codes.begin(), q.codes.end(), &r.x_fp8[at * cfg.hidden]));
            for (int64_t c = 0; c < cfg.scale_cols(); ++c)
              ASSERT_EQ(float_to_bits(q.scales[c]), float_to_bits(r.x_scales[at * 2 + c]));
          }
        }
        ASSERT_EQ(r.count[s], expect);
      }
      const GroupedLayout g =
          grouped_layout(ids.data(), r.total(), cfg.top_k, ExpertSharding{16, 4}, d);
      const GroupedRecv& mine = res[d].grouped;
      ASSERT_EQ(mine.num_rows, g.num_rows());
      EXPECT_EQ(mine.expert_counts, g.expert_counts);
      EXPECT_EQ(mine.expert_offsets, g.expert_offsets);
      EXPECT_TRUE(std::equal(g.m_indices.begin(), g.m_indices.end(), mine.m_indices.begin()));
      EXPECT_TRUE(std::equal(g.row_src.begin(), g.row_src.end(), mine.row_src.begin()));
      for (int64_t row = g.num_rows(); row < cfg.row_bound(); ++row)
        EXPECT_EQ(mine.m_indices[row], -1);
    }
  }
}

TEST(EpReference, MaskedLayoutMatchesMoe) {
  EpConfig cfg = config(4, 0, 16, 4, 128, 40, Payload::kFP8);
  cfg.masked_capacity = 64;
  const auto data = make_inputs(cfg, {40, 17, 0, 33}, Routing::kRandom, 8);
  const auto res = dispatch_reference(cfg, batches_of(data));
  for (int d = 0; d < 4; ++d) {
    const RecvTokens& r = res[d].recv;
    std::vector<int32_t> ids;
    for (int s = 0; s < 4; ++s)
      for (int64_t j = 0; j < r.count[s]; ++j) {
        const int32_t t = r.src_token[s * 40 + j];
        for (int k = 0; k < 4; ++k) ids.push_back(data[s].idx[t * 4 + k]);
      }
    const MaskedLayout m = masked_layout(ids.data(), r.total(), 4, d * 4, d * 4 + 4, 64);
    const GroupedRecv& g = res[d].grouped;
    ASSERT_FALSE(g.overflow);
    EXPECT_EQ(g.expert_counts, m.masked_m);
    EXPECT_EQ(g.row_src, m.row_src);
    EXPECT_EQ(g.num_rows, 4 * 64);
  }
  cfg.masked_capacity = 4;  // far too small
  const auto over = dispatch_reference(cfg, batches_of(data));
  EXPECT_TRUE(over[0].grouped.overflow);
  EXPECT_GT(over[0].grouped.rows_needed, 4);
}

TEST(EpReference, IdentityExpertsReturnInputTimesWeightSum) {
  for (int G : {0, 2}) {
    EpConfig cfg = config(4, G, 32, 8, 128, 24, Payload::kBF16);
    const auto data = make_inputs(cfg, {24, 5, 0, 19}, Routing::kExact, 11);
    const auto res = dispatch_reference(cfg, batches_of(data));
    std::vector<const uint16_t*> y;
    for (const auto& r : res) y.push_back(r.grouped.x_bf16.data());  // identity experts
    const auto out = combine_reference(cfg, res, y);
    for (int s = 0; s < 4; ++s)
      for (int64_t t = 0; t < data[s].tokens; ++t) {
        float wsum = 0;
        for (int k = 0; k < 8; ++k) wsum += data[s].w[t * 8 + k];
        for (int64_t h = 3; h < cfg.hidden; ++h)
          ASSERT_EQ(bf16_bits_to_float(out[s][t * cfg.hidden + h]),
                    bf16_bits_to_float(data[s].x[t * cfg.hidden + h]) * wsum)
              << "rank " << s << " token " << t << " h " << h;
      }
  }
}

TEST(EpReference, RejectsBadInput) {
  EpConfig cfg = config(4, 2, 16, 2, 128, 8, Payload::kBF16);
  auto data = make_inputs(cfg, {8, 8, 8, 8}, Routing::kRandom, 3);
  data[1].idx[3] = 16;
  try {
    dispatch_reference(cfg, batches_of(data));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("rank 1 token 1"), std::string::npos) << e.message();
  }
  data = make_inputs(cfg, {8, 8, 8, 8}, Routing::kRandom, 3);
  data[2].tokens = 9;
  EXPECT_THROW(dispatch_reference(cfg, batches_of(data)), Error);
  // Node limit: experts 0 (node 0) and 12 (node 1) with M = 1.
  cfg.max_nodes_per_token = 1;
  data = make_inputs(cfg, {8, 8, 8, 8}, Routing::kOneRank, 3);
  data[0].idx[0] = 0;
  data[0].idx[1] = 12;
  try {
    dispatch_reference(cfg, batches_of(data));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("span 2 nodes"), std::string::npos) << e.message();
  }
  EXPECT_THROW(validate(config(3, 0, 16, 2, 128, 8, Payload::kBF16)), Error);  // E % R
  EXPECT_THROW(validate(config(4, 3, 16, 2, 128, 8, Payload::kBF16)), Error);  // R % G
  EXPECT_THROW(validate(config(4, 0, 16, 2, 200, 8, Payload::kFP8)), Error);   // H % 128
}

TEST(EpReference, OverflowIsReportedNotWritten) {
  EpConfig cfg = config(2, 0, 4, 2, 128, 200, Payload::kBF16);
  cfg.max_rows = 256;  // 2 local experts each get far more than 128 rows
  const auto data = make_inputs(cfg, {200, 200}, Routing::kRandom, 5);
  const auto res = dispatch_reference(cfg, batches_of(data));
  for (const auto& r : res) {
    EXPECT_TRUE(r.grouped.overflow);
    EXPECT_GT(r.grouped.rows_needed, 256);
    EXPECT_EQ(r.grouped.num_rows, 0);
    EXPECT_EQ(r.grouped.m_indices.size(), 256u);
  }
  std::vector<const uint16_t*> y(2, nullptr);
  EXPECT_THROW(combine_reference(cfg, res, y), Error);
}

// ---- the CPU-threads back end against the reference ----

using Case = testing::EpCase;

void check_backend(const Case& c, Payload p, uint64_t seed) {
  SCOPED_TRACE(std::string(c.name) + " " + payload_name(p));
  EpConfig cfg = config(c.R, c.G, c.E, c.K, c.H, c.Tmax, p);
  cfg.masked_capacity = c.masked_capacity;
  const auto data = make_inputs(cfg, c.tokens, c.routing, seed);
  const auto want = dispatch_reference(cfg, batches_of(data));
  std::vector<std::vector<uint16_t>> ys;
  std::vector<const uint16_t*> y;
  std::vector<std::vector<uint16_t>> grads;  // one row per received slot
  std::vector<const uint16_t*> g;
  for (int d = 0; d < c.R; ++d) {
    ys.push_back(testing::expert_outputs(cfg, d, seed));
    EpConfig rows_cfg = cfg;  // one row per received slot, drawn on their own
    rows_cfg.masked_capacity = 0;
    rows_cfg.max_rows = (cfg.max_recv_tokens() + 127) / 128 * 128;
    grads.push_back(testing::expert_outputs(rows_cfg, d, seed + 1));
  }
  for (int d = 0; d < c.R; ++d) {
    y.push_back(ys[d].data());
    g.push_back(grads[d].data());
  }
  const auto want_out = combine_reference(cfg, want, y);
  const auto want_back = combine_tokens_reference(cfg, want, g);

  CpuThreadGroup group(cfg);
  std::vector<DispatchResult> got(c.R);
  std::vector<std::vector<uint16_t>> out(c.R), back(c.R), out2(c.R);
  run_ranks(c.R, [&](int r) {
    auto ep = group.rank(r);
    got[r] = ep->dispatch(data[r].batch());
    out[r] = ep->combine(got[r], y[r]);
    back[r] = ep->combine_tokens(got[r], g[r]);
    // A second round through the same mailboxes (epochs, consumed counters).
    const DispatchResult again = ep->dispatch(data[r].batch());
    out2[r] = ep->combine(again, y[r]);
  });
  for (int d = 0; d < c.R; ++d) expect_same_dispatch(cfg, want[d], got[d], d);
  for (int s = 0; s < c.R; ++s) {
    EXPECT_EQ(out[s], want_out[s]) << "combine, rank " << s;
    EXPECT_EQ(back[s], want_back[s]) << "combine_tokens, rank " << s;
    EXPECT_EQ(out2[s], want_out[s]) << "second round, rank " << s;
  }
}

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {"random", 4, 0, 16, 4, 256, 48, {48, 31, 7, 40}, Routing::kRandom},
      {"skewed", 4, 0, 16, 4, 128, 40, {40, 40, 40, 40}, Routing::kSkewed},
      {"one_rank", 4, 0, 16, 4, 128, 32, {32, 1, 20, 32}, Routing::kOneRank},
      {"none_to_last", 4, 0, 16, 2, 128, 32, {32, 32, 32, 32}, Routing::kNoneToLastRank},
      {"t0", 3, 0, 12, 3, 128, 16, {0, 16, 0}, Routing::kRandom},
      {"all_t0", 2, 0, 4, 2, 128, 8, {0, 0}, Routing::kRandom},
      {"k1", 4, 0, 8, 1, 128, 64, {64, 50, 3, 64}, Routing::kRandom},
      {"k8", 2, 0, 16, 8, 128, 40, {40, 33}, Routing::kRandom},
      {"holes", 4, 0, 32, 8, 128, 24, {24, 24, 5, 24}, Routing::kHoles},
      {"two_stage_2x2", 4, 2, 16, 4, 256, 32, {32, 17, 30, 0}, Routing::kRandom},
      {"two_stage_4x2_k8", 8, 2, 32, 8, 128, 16, {16, 9, 16, 0, 11, 16, 2, 16}, Routing::kRandom},
      {"two_stage_2x4_skewed",
       8,
       4,
       32,
       4,
       128,
       16,
       {16, 16, 16, 16, 16, 16, 16, 16},
       Routing::kSkewed},
      {"two_stage_one_rank", 6, 3, 12, 2, 128, 20, {20, 3, 20, 20, 0, 20}, Routing::kOneRank},
      {"masked", 4, 0, 16, 4, 128, 32, {32, 20, 0, 32}, Routing::kRandom, 128},
      {"masked_two_stage", 4, 2, 16, 8, 128, 32, {32, 20, 9, 32}, Routing::kSkewed, 128},
  };
  return c;
}

TEST(EpCpuThreads, MatchesReferenceBf16) {
  for (const Case& c : cases()) check_backend(c, Payload::kBF16, 21);
}
TEST(EpCpuThreads, MatchesReferenceFp8) {
  for (const Case& c : cases()) check_backend(c, Payload::kFP8, 22);
}

TEST(EpCpuThreads, TwoStageSendsATokenOncePerNode) {
  // 4 ranks in 2 nodes: a token of rank 0 with experts on ranks 2 and 3 (node 1) reaches node 1
  // once, through rank 2 (rank 0's local index 0 in node 1).
  EpConfig cfg = config(4, 2, 8, 2, 128, 4, Payload::kBF16);
  auto data = make_inputs(cfg, {1, 0, 0, 0}, Routing::kRandom, 1);
  data[0].idx = {4, 6};
  CpuThreadGroup group(cfg);
  std::vector<DispatchResult> got(4);
  run_ranks(4, [&](int r) { got[r] = group.rank(r)->dispatch(data[r].batch()); });
  EXPECT_EQ(got[0].handle.node_slot, (std::vector<int32_t>{-1, 0}));
  EXPECT_EQ(got[2].forward.count[0], 1);         // rank 2 forwarded one token of rank 0
  EXPECT_EQ(got[2].forward.slot[0 * 2 + 0], 0);  // to rank 2 (local 0), slot 0
  EXPECT_EQ(got[2].forward.slot[0 * 2 + 1], 0);  // to rank 3 (local 1), slot 0
  EXPECT_EQ(got[3].forward.count[0], 0);
  EXPECT_EQ(got[2].recv.count[0], 1);
  EXPECT_EQ(got[3].recv.count[0], 1);
}

TEST(EpCpuThreads, SilentPeerTimesOutNamingRankPeerAndCounter) {
  EpConfig cfg = config(2, 0, 4, 2, 128, 4, Payload::kBF16);
  cfg.timeout_s = 0.2;
  const auto data = make_inputs(cfg, {4, 4}, Routing::kRandom, 1);
  CpuThreadGroup group(cfg);
  auto ep = group.rank(0);  // rank 1 never shows up
  try {
    ep->dispatch(data[0].batch());
    FAIL() << "expected a timeout";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
    const std::string m = e.message();
    EXPECT_NE(m.find("rank 0: peer 1 did not answer within 0.2 s"), std::string::npos) << m;
    EXPECT_NE(m.find("dispatch.recv.arrived[rank=0][src=1]"), std::string::npos) << m;
    EXPECT_NE(m.find("expected >= 1, seen 0"), std::string::npos) << m;
  }
}

TEST(EpCpuThreads, PeerThatStopsBeforeCombineTimesOut) {
  EpConfig cfg = config(2, 0, 4, 2, 128, 4, Payload::kBF16);
  cfg.timeout_s = 0.2;
  const auto data = make_inputs(cfg, {4, 4}, Routing::kOneRank, 2);
  CpuThreadGroup group(cfg);
  const auto y = testing::expert_outputs(cfg, 0, 1);
  std::string message;
  run_ranks(2, [&](int r) {
    auto ep = group.rank(r);
    const DispatchResult d = ep->dispatch(data[r].batch());
    if (r == 1) return;  // dies after dispatch
    try {
      ep->combine(d, y.data());
    } catch (const Error& e) {
      message = e.message();
    }
  });
  EXPECT_NE(message.find("rank 0: peer 1"), std::string::npos) << message;
  EXPECT_NE(message.find("combine.gather.arrived[rank=0][src=0][local=1], expected >= 1, seen 0"),
            std::string::npos)
      << message;
}

TEST(EpCpuThreads, OverflowIsReported) {
  EpConfig cfg = config(2, 0, 4, 2, 128, 200, Payload::kFP8);
  cfg.max_rows = 256;
  const auto data = make_inputs(cfg, {200, 200}, Routing::kRandom, 5);
  CpuThreadGroup group(cfg);
  std::vector<DispatchResult> got(2);
  std::vector<std::string> errors(2);
  run_ranks(2, [&](int r) {
    auto ep = group.rank(r);
    got[r] = ep->dispatch(data[r].batch());
    try {
      ep->combine(got[r], nullptr);
    } catch (const Error& e) {
      errors[r] = e.message();
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(got[r].grouped.overflow);
    EXPECT_GT(got[r].grouped.rows_needed, 256);
    EXPECT_NE(errors[r].find("overflowed its row bound"), std::string::npos) << errors[r];
  }
}

}  // namespace
}  // namespace fp8moe::comm
