// Combine backward (fp8moe/comm/ep.h): the reference checked against finite differences of the
// forward definition computed in double, then the CPU-threads back end (one and two stages)
// against the reference bit for bit, bad input and a silent peer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "ep_test_util.h"
#include "fp8moe/comm/cpu_transport.h"
#include "fp8moe/core/error.h"

namespace fp8moe::comm {
namespace {

using testing::batches_of;
using testing::make_inputs;
using testing::RankData;
using testing::Routing;
using testing::run_ranks;

using testing::config;

// Output gradients [T_s, H] BF16 per source (normal values, a few exact zeros).
std::vector<std::vector<uint16_t>> output_grads(const EpConfig& cfg, const std::vector<RankData>& d,
                                                uint64_t seed) {
  std::vector<std::vector<uint16_t>> g(cfg.num_ranks);
  for (int s = 0; s < cfg.num_ranks; ++s) {
    g[s].resize(d[s].tokens * cfg.hidden);
    for (size_t i = 0; i < g[s].size(); ++i)
      g[s][i] = i % 17 == 3 ? 0 : float_to_bf16_bits(philox_normal(seed, 7000 + s, i));
  }
  return g;
}

std::vector<std::span<const uint16_t>> spans(const std::vector<std::vector<uint16_t>>& v) {
  return {v.begin(), v.end()};
}

std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bits(v[i]);
  return b;
}

// ---- the reference against the definition ----

// The expert row of every (source, token, k) of the forward, -1 for a dropped slot.
struct RowOf {
  int rank = -1;
  int32_t row = -1;
};
std::vector<std::vector<RowOf>> rows_of(const EpConfig& cfg, const std::vector<RankData>& data,
                                        const std::vector<DispatchResult>& disp) {
  const int R = cfg.num_ranks, K = cfg.top_k;
  std::vector<std::vector<RowOf>> m(R);
  for (int s = 0; s < R; ++s) {
    m[s].resize(data[s].tokens * K);
    for (int64_t t = 0; t < data[s].tokens; ++t)
      for (int k = 0; k < K; ++k) {
        const int32_t e = data[s].idx[t * K + k];
        if (e < 0) continue;
        const int d = e / cfg.experts_per_rank();
        const int32_t j = disp[s].handle.slot[t * R + d];
        m[s][t * K + k] = {d,
                           disp[d].grouped.token_rows[(s * cfg.max_tokens_per_rank + j) * K + k]};
      }
  }
  return m;
}

TEST(CombineBackwardReference, IsTheGradientOfTheForwardDefinition) {
  for (int G : {0, 2}) {
    SCOPED_TRACE("gpus_per_node " + std::to_string(G));
    const EpConfig cfg = config(4, G, 16, 4, 32, 12, Payload::kBF16);
    const int R = 4, K = 4;
    const int64_t H = cfg.hidden;
    const auto data = make_inputs(cfg, {12, 5, 0, 9}, Routing::kHoles, 41);
    const auto disp = dispatch_reference(cfg, batches_of(data));
    std::vector<std::vector<uint16_t>> ys;
    for (int d = 0; d < R; ++d) ys.push_back(testing::expert_outputs(cfg, d, 42));
    const auto go = output_grads(cfg, data, 43);
    const auto got = combine_backward_reference(cfg, disp, spans(go), spans(ys));
    const auto row = rows_of(cfg, data, disp);

    // The forward definition in double (no roundings): out[t] = sum_k w[t,k] y[row(t,k)], with
    // y and w as variables; loss = sum over t, h of out[t,h] * grad_out[t,h].
    std::vector<std::vector<double>> yv(R), wv(R);
    for (int d = 0; d < R; ++d)
      for (uint16_t b : ys[d]) yv[d].push_back(bf16_bits_to_float(b));
    for (int s = 0; s < R; ++s)
      for (float w : data[s].w) wv[s].push_back(w);
    auto loss = [&] {
      double l = 0;
      for (int s = 0; s < R; ++s)
        for (int64_t t = 0; t < data[s].tokens; ++t)
          for (int k = 0; k < K; ++k) {
            const RowOf r = row[s][t * K + k];
            if (r.row < 0) continue;
            for (int64_t h = 0; h < H; ++h)
              l += wv[s][t * K + k] * yv[r.rank][r.row * H + h] *
                   bf16_bits_to_float(go[s][t * H + h]);
          }
      return l;
    };
    // The loss is linear in each variable, so a central difference is its derivative up to the
    // double rounding of the loss.
    auto derivative = [&](double& v) {
      const double v0 = v, eps = 0.5;
      v = v0 + eps;
      const double up = loss();
      v = v0 - eps;
      const double down = loss();
      v = v0;
      return (up - down) / (2 * eps);
    };

    // The definition agrees with the rounded combine within its three BF16 roundings.
    std::vector<const uint16_t*> yp;
    for (const auto& y : ys) yp.push_back(y.data());
    const auto out = combine_reference(cfg, disp, yp);
    for (int s = 0; s < R; ++s)
      for (int64_t t = 0; t < data[s].tokens; ++t)
        for (int64_t h = 0; h < H; ++h) {
          double exact = 0, mag = 0;
          for (int k = 0; k < K; ++k) {
            const RowOf r = row[s][t * K + k];
            if (r.row < 0) continue;
            exact += wv[s][t * K + k] * yv[r.rank][r.row * H + h];
            mag += std::fabs(wv[s][t * K + k] * yv[r.rank][r.row * H + h]);
          }
          ASSERT_NEAR(bf16_bits_to_float(out[s][t * H + h]), exact, 0x1p-7 * mag + 1e-30);
        }

    // grad_w at every slot; a dropped slot is exactly +0.
    int checked_w = 0;
    for (int s = 0; s < R; ++s)
      for (int64_t t = 0; t < data[s].tokens; ++t)
        for (int k = 0; k < K; ++k) {
          const float g = got.grad_w[s][t * K + k];
          const RowOf r = row[s][t * K + k];
          if (r.row < 0) {
            EXPECT_EQ(float_to_bits(g), 0u) << "dropped slot " << s << "/" << t << "/" << k;
            continue;
          }
          double mag = 0;
          for (int64_t h = 0; h < H; ++h)
            mag += std::fabs(yv[r.rank][r.row * H + h] * bf16_bits_to_float(go[s][t * H + h]));
          const double want = derivative(wv[s][t * K + k]);
          ASSERT_NEAR(g, want, 1e-5 * mag + 1e-12) << "rank " << s << " token " << t << " k " << k;
          ++checked_w;
        }
    EXPECT_GT(checked_w, 40);

    // grad_y at every used row (each row has one slot); every other row is +0.
    int checked_y = 0;
    for (int d = 0; d < R; ++d) {
      std::vector<uint8_t> used(cfg.row_bound(), 0);
      for (int s = 0; s < R; ++s)
        for (const RowOf& r : row[s])
          if (r.rank == d) used[r.row] = 1;
      for (int64_t rw = 0; rw < cfg.row_bound(); ++rw)
        for (int64_t h = 0; h < H; ++h) {
          const float g = bf16_bits_to_float(got.grad_y[d][rw * H + h]);
          if (!used[rw]) {
            ASSERT_EQ(got.grad_y[d][rw * H + h], 0) << "rank " << d << " unused row " << rw;
            continue;
          }
          const double want = derivative(yv[d][rw * H + h]);
          // One float product rounded to BF16: relative 2^-9, plus the product's 2^-24.
          ASSERT_NEAR(g, want, 0x1p-8 * std::fabs(want) + 1e-30) << "rank " << d << " row " << rw;
          ++checked_y;
        }
    }
    EXPECT_GT(checked_y, 40 * H);
  }
}

TEST(CombineBackwardReference, RejectsBadInput) {
  EpConfig cfg = config(4, 2, 16, 2, 128, 8, Payload::kBF16);
  const auto data = make_inputs(cfg, {8, 3, 0, 8}, Routing::kRandom, 3);
  const auto disp = dispatch_reference(cfg, batches_of(data));
  std::vector<std::vector<uint16_t>> ys;
  for (int d = 0; d < 4; ++d) ys.push_back(testing::expert_outputs(cfg, d, 1));
  auto go = output_grads(cfg, data, 2);
  auto expect_error = [&](const std::string& what) {
    try {
      combine_backward_reference(cfg, disp, spans(go), spans(ys));
      FAIL() << "expected an error containing: " << what;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_NE(e.message().find(what), std::string::npos) << e.message();
    }
  };
  EXPECT_NO_THROW(combine_backward_reference(cfg, disp, spans(go), spans(ys)));
  go[1].pop_back();
  expect_error("rank 1: grad_out has 383 values, expected T*H = 3*128 = 384");
  go[1].push_back(0);
  ys[2].resize(ys[2].size() + 128);
  expect_error("rank 2: y has");
  ys[2].resize(ys[2].size() - 128);
  go.pop_back();
  expect_error("one dispatch result, grad_out and y per rank (4 ranks): got 4, 3, 4");

  // A dispatch that overflowed its row bound cannot be differentiated.
  cfg = config(2, 0, 4, 2, 128, 200, Payload::kBF16);
  cfg.max_rows = 256;
  const auto big = make_inputs(cfg, {200, 200}, Routing::kRandom, 5);
  const auto over = dispatch_reference(cfg, batches_of(big));
  const auto gb = output_grads(cfg, big, 6);
  std::vector<std::vector<uint16_t>> yb(2, std::vector<uint16_t>(256 * 128));
  try {
    combine_backward_reference(cfg, over, spans(gb), spans(yb));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("overflowed its row bound"), std::string::npos) << e.message();
  }
}

// ---- the CPU-threads back end against the reference ----

using Case = testing::EpCase;

void check_backend(const Case& c, Payload p, uint64_t seed) {
  SCOPED_TRACE(std::string(c.name) + " " + payload_name(p));
  EpConfig cfg = config(c.R, c.G, c.E, c.K, c.H, c.Tmax, p);
  cfg.masked_capacity = c.masked_capacity;
  const auto data = make_inputs(cfg, c.tokens, c.routing, seed);
  const auto disp = dispatch_reference(cfg, batches_of(data));
  std::vector<std::vector<uint16_t>> ys;
  for (int d = 0; d < c.R; ++d) ys.push_back(testing::expert_outputs(cfg, d, seed));
  const auto go1 = output_grads(cfg, data, seed + 1);
  const auto go2 = output_grads(cfg, data, seed + 2);
  const auto want1 = combine_backward_reference(cfg, disp, spans(go1), spans(ys));
  const auto want2 = combine_backward_reference(cfg, disp, spans(go2), spans(ys));

  CpuThreadGroup group(cfg);
  std::vector<RankCombineBackward> got1(c.R), got2(c.R);
  run_ranks(c.R, [&](int r) {
    auto ep = group.rank(r);
    const DispatchResult d = ep->dispatch(data[r].batch());
    ep->combine(d, ys[r].data());
    got1[r] = ep->combine_backward(d, go1[r], ys[r]);
    // A second round through the same mailboxes (epochs, consumed counters), other gradients.
    const DispatchResult again = ep->dispatch(data[r].batch());
    got2[r] = ep->combine_backward(again, go2[r], ys[r]);
  });
  for (int r = 0; r < c.R; ++r) {
    EXPECT_EQ(got1[r].grad_y, want1.grad_y[r]) << "grad_y, rank " << r;
    EXPECT_EQ(bits(got1[r].grad_w), bits(want1.grad_w[r])) << "grad_w, rank " << r;
    EXPECT_EQ(got2[r].grad_y, want2.grad_y[r]) << "second round grad_y, rank " << r;
    EXPECT_EQ(bits(got2[r].grad_w), bits(want2.grad_w[r])) << "second round grad_w, rank " << r;
  }
}

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {"random", 4, 0, 16, 4, 256, 48, {48, 31, 7, 40}, Routing::kRandom},
      {"skewed", 4, 0, 16, 4, 128, 40, {40, 40, 40, 40}, Routing::kSkewed},
      {"one_rank", 4, 0, 16, 4, 128, 32, {32, 1, 20, 32}, Routing::kOneRank},
      {"none_to_last", 4, 0, 16, 2, 128, 32, {32, 32, 32, 32}, Routing::kNoneToLastRank},
      {"holes", 4, 0, 32, 8, 128, 24, {24, 24, 5, 24}, Routing::kHoles},
      {"t0", 3, 0, 12, 3, 128, 16, {0, 16, 0}, Routing::kRandom},
      {"all_t0", 2, 0, 4, 2, 128, 8, {0, 0}, Routing::kRandom},
      {"k1", 4, 0, 8, 1, 128, 64, {64, 50, 3, 64}, Routing::kRandom},
      {"k8", 2, 0, 16, 8, 128, 40, {40, 33}, Routing::kRandom},
      {"masked", 4, 0, 16, 4, 128, 32, {32, 20, 0, 32}, Routing::kRandom, 128},
      {"two_stage_2x2", 4, 2, 16, 4, 256, 32, {32, 17, 30, 0}, Routing::kRandom},
      {"two_stage_2x2_holes", 4, 2, 16, 4, 128, 32, {32, 17, 30, 5}, Routing::kHoles},
      {"two_stage_4x1", 4, 1, 16, 4, 128, 20, {20, 3, 0, 20}, Routing::kSkewed},
      {"two_stage_4x2_k8", 8, 2, 32, 8, 128, 16, {16, 9, 16, 0, 11, 16, 2, 16}, Routing::kRandom},
      {"masked_two_stage", 4, 2, 16, 8, 128, 32, {32, 20, 9, 32}, Routing::kSkewed, 128},
  };
  return c;
}

TEST(CombineBackwardCpuThreads, MatchesReferenceBf16) {
  for (const Case& c : cases()) check_backend(c, Payload::kBF16, 61);
}
TEST(CombineBackwardCpuThreads, MatchesReferenceFp8) {
  for (const Case& c : cases()) check_backend(c, Payload::kFP8, 62);
}

TEST(CombineBackwardCpuThreads, RejectsBadInputNamingTheRank) {
  EpConfig cfg = config(2, 0, 4, 2, 128, 4, Payload::kBF16);
  cfg.timeout_s = 0.2;
  const auto data = make_inputs(cfg, {4, 4}, Routing::kRandom, 1);
  const auto ref = dispatch_reference(cfg, batches_of(data));
  const auto y = testing::expert_outputs(cfg, 1, 1);
  const auto go = output_grads(cfg, data, 2);
  CpuThreadGroup group(cfg);
  auto ep = group.rank(1);
  // Checked before any communication, so a lone rank gets the error at once, not a timeout.
  try {
    ep->combine_backward(ref[1], std::span(go[1]).first(5), y);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("rank 1: grad_out has 5 values, expected T*H = 4*128 = 512"),
              std::string::npos)
        << e.message();
  }
  try {
    ep->combine_backward(ref[1], go[1], std::span(y).first(128));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("rank 1: y has 128 values"), std::string::npos) << e.message();
  }
  try {  // the reference's dispatch result has no forwarding handles
    ep->combine_backward(ref[1], go[1], y);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("rank 1: combine_backward needs this group's dispatch result"),
              std::string::npos)
        << e.message();
  }
}

TEST(CombineBackwardCpuThreads, SilentPeerTimesOutNamingRankPeerAndCounter) {
  EpConfig cfg = config(2, 0, 4, 2, 128, 4, Payload::kBF16);
  cfg.timeout_s = 0.2;
  const auto data = make_inputs(cfg, {4, 4}, Routing::kRandom, 1);
  const auto go = output_grads(cfg, data, 2);
  CpuThreadGroup group(cfg);
  const auto y = testing::expert_outputs(cfg, 0, 1);
  std::string message;
  run_ranks(2, [&](int r) {
    auto ep = group.rank(r);
    const DispatchResult d = ep->dispatch(data[r].batch());
    if (r == 1) return;  // stops after dispatch
    try {
      ep->combine_backward(d, go[0], y);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kRuntime);
      message = e.message();
    }
  });
  EXPECT_NE(message.find("rank 0: peer 1 did not answer within 0.2 s"), std::string::npos)
      << message;
  EXPECT_NE(message.find("combine_bwd.rows.recv.arrived[rank=0][src=1], expected >= 1, seen 0"),
            std::string::npos)
      << message;
}

}  // namespace
}  // namespace fp8moe::comm
