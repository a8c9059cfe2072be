// The routed + shared MoE layer's CPU reference (comm/moe_layer_reference.h): against a plain
// FP32 MoE (top-k weighted sum of SwiGLU experts plus the shared expert, unquantised), its pieces
// composed exactly as documented, the BF16 add's single rounding, and the shape checks
// MoeLayerGpu shares (validate_moe_layer). Run: build-*/tests/test_comm
// --gtest_filter='MoeLayerApi*'.
#include "fp8moe/comm/moe_layer_reference.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../support/expect_invalid.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "moe_layer_test_common.h"

namespace fp8moe::comm {
namespace {

using fp8moe::test::expect_invalid;

struct Weights {  // FP32, nn.Linear's [out, in]
  int64_t G, H, I;
  std::vector<float> gate, up, down;
  ExpertWeightsHost q;
};

Weights make_weights(int64_t G, int64_t H, int64_t I, PhiloxStream& rng, float sd = 1.0f) {
  Weights w{G, H, I, {}, {}, {}, {}};
  auto fill = [&](std::vector<float>& v, int64_t n, float s) {
    v.resize(n);
    for (float& e : v) e = s * rng.normal();
  };
  fill(w.gate, G * I * H, sd / std::sqrt(float(H)));
  fill(w.up, G * I * H, sd / std::sqrt(float(H)));
  fill(w.down, G * H * I, sd / std::sqrt(float(I)));
  w.q = quantize_expert_weights(w.gate.data(), w.up.data(), w.down.data(), G, H, I);
  return w;
}

// Expert e of w on x [H] in FP32 (double sums), accumulated into y with factor f.
void fp32_ffn(const Weights& w, int64_t e, const float* x, double f, std::vector<double>& y) {
  const int64_t H = w.H, I = w.I;
  std::vector<double> h(I);
  for (int64_t j = 0; j < I; ++j) {
    double g = 0, u = 0;
    for (int64_t c = 0; c < H; ++c) {
      g += double(x[c]) * w.gate[(e * I + j) * H + c];
      u += double(x[c]) * w.up[(e * I + j) * H + c];
    }
    h[j] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int64_t c = 0; c < H; ++c) {
    double s = 0;
    for (int64_t j = 0; j < I; ++j) s += h[j] * w.down[(e * H + c) * I + j];
    y[c] += f * s;
  }
}

struct Case {
  EpConfig cfg;
  std::vector<int64_t> tokens;
  std::vector<std::vector<uint16_t>> x;
  std::vector<std::vector<int32_t>> idx;
  std::vector<std::vector<float>> w;
  std::vector<Weights> routed, shared;
  std::vector<TokenBatch> batches() const {
    std::vector<TokenBatch> b;
    for (size_t r = 0; r < x.size(); ++r)
      b.push_back({tokens[r], x[r].data(), idx[r].data(), w[r].data()});
    return b;
  }
  std::vector<const ExpertWeightsHost*> q(const std::vector<Weights>& v) const {
    std::vector<const ExpertWeightsHost*> out;
    for (const Weights& e : v) out.push_back(&e.q);
    return out;
  }
};

EpConfig small_config() {
  return testing::two_rank_fp8_config(8, 3, 256, 160);
}

// Fresh random tokens (magnitudes 2^-3..2^3 per token), routing with some dropped slots (-1).
Case make_case(const EpConfig& cfg, std::vector<int64_t> tokens, int64_t inter,
               int64_t shared_inter, uint64_t seed, float shared_sd = 1.0f) {
  Case c;
  c.cfg = cfg;
  c.tokens = std::move(tokens);
  PhiloxStream rng(seed, 0);
  const int R = cfg.num_ranks, K = cfg.top_k;
  const int64_t H = cfg.hidden;
  for (int r = 0; r < R; ++r) {
    std::vector<uint16_t> x;
    std::vector<int32_t> idx;
    std::vector<float> w;
    for (int64_t t = 0; t < c.tokens[r]; ++t) {
      const float mag = std::exp2(rng.uniform(-3.0f, 3.0f));
      for (int64_t h = 0; h < H; ++h) x.push_back(float_to_bf16_bits(mag * rng.normal()));
      std::vector<int32_t> e(cfg.num_experts);
      for (int i = 0; i < cfg.num_experts; ++i) e[i] = i;
      for (int k = 0; k < K; ++k) {  // a partial Fisher-Yates: K distinct experts
        const int j = k + static_cast<int>(rng.next_u32() % (cfg.num_experts - k));
        std::swap(e[k], e[j]);
        idx.push_back(rng.next_u32() % 16 == 0 ? -1 : e[k]);
        w.push_back(rng.uniform(0.05f, 1.0f));
      }
    }
    c.x.push_back(std::move(x));
    c.idx.push_back(std::move(idx));
    c.w.push_back(std::move(w));
    c.routed.push_back(make_weights(cfg.experts_per_rank(), H, inter, rng));
    c.shared.push_back(make_weights(1, H, shared_inter, rng, shared_sd));
  }
  return c;
}

TEST(MoeLayerApi, ReferenceMatchesPlainFp32Moe) {
  const EpConfig cfg = small_config();
  const Case c = make_case(cfg, {150, 61}, 128, 256, testing::fresh_seed());
  const MoeLayerReference ref =
      moe_layer_reference(cfg, c.batches(), c.q(c.routed), c.q(c.shared), false, 2);
  const int64_t H = cfg.hidden;
  const int L = cfg.experts_per_rank(), K = cfg.top_k;
  for (int s = 0; s < cfg.num_ranks; ++s) {
    double num = 0, den = 0;
    std::vector<float> x(H);
    for (int64_t t = 0; t < c.tokens[s]; ++t) {
      for (int64_t h = 0; h < H; ++h) x[h] = bf16_bits_to_float(c.x[s][t * H + h]);
      std::vector<double> y(H, 0.0);
      for (int k = 0; k < K; ++k) {
        const int e = c.idx[s][t * K + k];
        if (e >= 0) fp32_ffn(c.routed[e / L], e % L, x.data(), c.w[s][t * K + k], y);
      }
      fp32_ffn(c.shared[s], 0, x.data(), 1.0, y);
      for (int64_t h = 0; h < H; ++h) {
        const double d = bf16_bits_to_float(ref.y[s][t * H + h]) - y[h];
        num += d * d;
        den += y[h] * y[h];
      }
    }
    const double err = std::sqrt(num / den);
    std::printf("rank %d: %lld tokens, |y_ref - y_fp32| / |y_fp32| = %.3g\n", s,
                static_cast<long long>(c.tokens[s]), err);
    EXPECT_LT(err, 0.08) << "rank " << s;  // FP8 x, weights and h (expert_ffn_test's bound)
  }
}

TEST(MoeLayerApi, ReferencePiecesComposeAsDocumented) {
  const EpConfig cfg = small_config();
  const int64_t H = cfg.hidden;
  const uint64_t seed = testing::fresh_seed();
  const Case c = make_case(cfg, {160, 0}, 256, 128, seed);
  const MoeLayerReference ref =
      moe_layer_reference(cfg, c.batches(), c.q(c.routed), c.q(c.shared), true, 2);
  std::vector<const uint16_t*> rows;
  for (const auto& r : ref.expert_rows) rows.push_back(r.data());
  const auto routed = combine_reference(cfg, ref.dispatched, rows);
  for (int s = 0; s < cfg.num_ranks; ++s) {
    ASSERT_EQ(ref.routed_out[s], routed[s]) << "rank " << s;
    ASSERT_EQ(ref.y[s].size(), static_cast<size_t>(c.tokens[s] * H));
    std::vector<uint16_t> y(c.tokens[s] * H);
    add_bf16_reference(ref.routed_out[s].data(), ref.shared_out[s].data(), c.tokens[s] * H,
                       y.data());
    ASSERT_EQ(ref.y[s], y) << "rank " << s;
  }
  // A zero shared expert (all-zero weights: scale 1, codes 0) adds +0: y is the routed part.
  const Case z = make_case(cfg, {160, 0}, 256, 128, seed, 0.0f);
  const MoeLayerReference rz =
      moe_layer_reference(cfg, z.batches(), z.q(z.routed), z.q(z.shared), true, 2);
  for (int s = 0; s < cfg.num_ranks; ++s) {
    for (uint16_t v : rz.shared_out[s]) ASSERT_EQ(bf16_bits_to_float(v), 0.0f);
    ASSERT_EQ(rz.y[s], rz.routed_out[s]) << "rank " << s;
  }
}

// The masked layout (low-latency mode) holds the same rows as the grouped one, each expert's
// at e * capacity instead of its 128-aligned offset: the layer's outputs equal bit for bit, and
// every expert row equals its grouped twin.
TEST(MoeLayerApi, ReferenceOnTheMaskedLayoutEqualsTheGroupedOne) {
  const EpConfig cfg = small_config();
  EpConfig masked = cfg;
  masked.masked_capacity = cfg.num_ranks * cfg.max_tokens_per_rank;  // no expert can overflow
  const Case c = make_case(cfg, {150, 61}, 128, 256, testing::fresh_seed());
  const MoeLayerReference g =
      moe_layer_reference(cfg, c.batches(), c.q(c.routed), c.q(c.shared), false, 2);
  const MoeLayerReference m =
      moe_layer_reference(masked, c.batches(), c.q(c.routed), c.q(c.shared), false, 2);
  const int64_t H = cfg.hidden;
  for (int r = 0; r < cfg.num_ranks; ++r) {
    ASSERT_EQ(m.y[r], g.y[r]) << "rank " << r;
    ASSERT_EQ(m.routed_out[r], g.routed_out[r]) << "rank " << r;
    const GroupedRecv &gg = g.dispatched[r].grouped, &mg = m.dispatched[r].grouped;
    int64_t rows = 0;
    for (int e = 0; e < cfg.experts_per_rank(); ++e) {
      ASSERT_EQ(mg.expert_counts[e], gg.expert_counts[e]) << "rank " << r << " expert " << e;
      for (int32_t i = 0; i < gg.expert_counts[e]; ++i, ++rows) {
        const int64_t gr = gg.expert_offsets[e] + i, mr = e * masked.masked_capacity + i;
        ASSERT_EQ(mg.m_indices[mr], e);
        ASSERT_TRUE(std::equal(m.expert_rows[r].begin() + mr * H,
                               m.expert_rows[r].begin() + (mr + 1) * H,
                               g.expert_rows[r].begin() + gr * H))
            << "rank " << r << " expert " << e << " row " << i;
      }
    }
    EXPECT_GT(rows, 0) << "rank " << r << " received no rows: the case tests nothing";
  }
}

TEST(MoeLayerApi, AddRoundsTheFp32SumOnceToNearestEven) {
  auto b = [](float v) { return float_to_bf16_bits(v); };
  // 1 + 2^-8 is half an ulp above 1 (BF16 ulp at 1 is 2^-7): the tie goes to even, 1.
  // 1 + 3 * 2^-8 is the tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even): 1 + 2^-6.
  // 1 + 2^-7 + 2^-8 from two BF16 inputs 1 + 2^-7 and 2^-8: a tie, to 1 + 2^-6.
  const std::vector<uint16_t> a = {b(1.0f), b(1.0f), b(1.0f + 0x1p-7f), b(-2.0f), b(0x1p-130f)};
  const std::vector<uint16_t> c = {b(0x1p-8f), b(0x1p-8f * 3), b(0x1p-8f), b(2.0f), b(0.0f)};
  std::vector<uint16_t> y(a.size());
  add_bf16_reference(a.data(), c.data(), static_cast<int64_t>(a.size()), y.data());
  EXPECT_EQ(bf16_bits_to_float(y[0]), 1.0f);
  EXPECT_EQ(bf16_bits_to_float(y[1]), 1.0f + 0x1p-6f);
  EXPECT_EQ(bf16_bits_to_float(y[2]), 1.0f + 0x1p-6f);
  EXPECT_EQ(y[3], 0x0000);                                                // -2 + 2 = +0
  EXPECT_EQ(bf16_bits_to_float(y[4]), bf16_bits_to_float(b(0x1p-130f)));  // subnormals kept
}

TEST(MoeLayerApi, BadShapesThrowNamingTheField) {
  const EpConfig cfg = small_config();  // 4 experts a rank, hidden 256
  const FfnDims routed{4, 256, 128}, shared{1, 256, 256};
  validate_moe_layer(cfg, routed, shared, "t");
  expect_invalid([&] { validate_moe_layer(cfg, {3, 256, 128}, shared, "t"); }, "experts_per_rank");
  expect_invalid(
      [&] {
        validate_moe_layer(cfg, {4, 512, 128}, shared, "t");
      },
      "routed weights have hidden=512");
  expect_invalid([&] { validate_moe_layer(cfg, routed, {2, 256, 256}, "t"); }, "2 groups");
  expect_invalid(
      [&] {
        validate_moe_layer(cfg, routed, {1, 128, 256}, "t");
      },
      "shared weights have hidden=128");
  expect_invalid([&] { validate_moe_layer(cfg, {4, 256, 100}, shared, "t"); }, "routed inter=100");
  expect_invalid([&] { validate_moe_layer(cfg, routed, {1, 256, 0}, "t"); }, "shared inter=0");
  EpConfig bf = cfg;
  bf.payload = Payload::kBF16;
  expect_invalid([&] { validate_moe_layer(bf, routed, shared, "t"); }, "FP8 payload");
  EpConfig masked = cfg;
  masked.masked_capacity = 64;
  validate_moe_layer(masked, routed, shared, "t");  // the masked layout: forward only
  EpConfig bad = cfg;
  bad.num_experts = 7;
  expect_invalid([&] { validate_moe_layer(bad, routed, shared, "t"); }, "num_experts=7");

  const Case c = make_case(cfg, {4, 4}, 128, 128, 5);
  auto rq = c.q(c.routed), sq = c.q(c.shared);
  expect_invalid([&] { moe_layer_reference(cfg, c.batches(), {rq[0]}, sq, false); }, "1 routed");
  expect_invalid(
      [&] {
        moe_layer_reference(cfg, c.batches(), rq, {sq[0], nullptr}, false);
      },
      "null weights of rank 1");
  expect_invalid(
      [&] {
        moe_layer_reference(cfg, c.batches(), {rq[0], sq[1]}, sq, false);
      },
      "moe_layer_reference rank 1: routed weights hold 1 experts");
}

}  // namespace
}  // namespace fp8moe::comm
