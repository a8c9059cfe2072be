// The routed + shared MoE layer's backward reference (comm/moe_layer_reference.h,
// moe_layer_backward_reference) on a tiny layer (2 ranks, 8 experts, top-3 with dropped slots,
// H 256, inter 128), fresh random inputs:
//   - every output against the FP32 chain rule of the same layer (the quantised weights
//     dequantised; x, the activations and gradients in double, no FP8 in between): the gap is
//     the FP8 quantisation of x, h, dy, d_gate_up (E4M3, 2^-4 relative steps) and a few BF16
//     roundings, as expert_ffn_backward_test's (8e-2 there, 1e-1 here: one more layer of
//     roundings; grad_topk_w 1.5e-1: each is one dot product of grad_y with an FP8 forward row
//     (0.061-0.067 vs FP32), whose cancellation scales its relative error up); a wrong row,
//     expert, slot or transposition gives O(1);
//   - grad_topk_w against central finite differences of moe_layer_reference itself in the gate
//     weights (y is linear in them before its BF16 roundings, so a wide step is exact but for
//     those roundings);
//   - argument checks.
// Run: build-*/tests/test_comm --gtest_filter='MoeLayerBackward*'.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../support/expect_invalid.h"
#include "fp8moe/comm/moe_layer_reference.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "moe_layer_test_common.h"

namespace fp8moe::comm {
namespace {

using fp8moe::test::expect_invalid;

constexpr int64_t kInter = 128, kSharedInter = 256;

EpConfig tiny_config() {
  return testing::two_rank_fp8_config(8, 3, 256, 48);
}

struct Layer {
  EpConfig cfg;
  std::vector<int64_t> tokens;
  std::vector<std::vector<uint16_t>> x, grad_y;
  std::vector<std::vector<int32_t>> idx;
  std::vector<std::vector<float>> w;
  std::vector<ExpertWeightsHost> routed, shared;

  std::vector<TokenBatch> batches() const {
    std::vector<TokenBatch> b;
    for (size_t r = 0; r < x.size(); ++r)
      b.push_back({tokens[r], x[r].data(), idx[r].data(), w[r].data()});
    return b;
  }
  std::vector<const ExpertWeightsHost*> ptrs(const std::vector<ExpertWeightsHost>& v) const {
    std::vector<const ExpertWeightsHost*> out;
    for (const auto& e : v) out.push_back(&e);
    return out;
  }
  std::vector<std::span<const uint16_t>> grads() const {
    std::vector<std::span<const uint16_t>> g;
    for (const auto& v : grad_y) g.emplace_back(v);
    return g;
  }
};

Layer make_layer(std::vector<int64_t> tokens, uint64_t seed) {
  Layer c;
  c.cfg = tiny_config();
  c.tokens = std::move(tokens);
  PhiloxStream rng(seed, 0);
  const EpConfig& cfg = c.cfg;
  const int R = cfg.num_ranks, K = cfg.top_k;
  const int64_t H = cfg.hidden;
  for (int r = 0; r < R; ++r) {
    std::vector<uint16_t> x, gy;
    std::vector<int32_t> idx;
    std::vector<float> w;
    for (int64_t t = 0; t < c.tokens[r]; ++t) {
      const float mag = std::exp2(rng.uniform(-2.0f, 2.0f));
      for (int64_t h = 0; h < H; ++h) x.push_back(float_to_bf16_bits(mag * rng.normal()));
      const float gmag = std::exp2(rng.uniform(-2.0f, 2.0f));
      for (int64_t h = 0; h < H; ++h) gy.push_back(float_to_bf16_bits(gmag * rng.normal()));
      std::vector<int32_t> e(cfg.num_experts);
      for (int i = 0; i < cfg.num_experts; ++i) e[i] = i;
      for (int k = 0; k < K; ++k) {  // K distinct experts, some slots dropped
        const int j = k + static_cast<int>(rng.next_u32() % (cfg.num_experts - k));
        std::swap(e[k], e[j]);
        idx.push_back(rng.next_u32() % 8 == 0 ? -1 : e[k]);
        w.push_back(rng.uniform(0.05f, 1.0f));
      }
    }
    c.x.push_back(std::move(x));
    c.grad_y.push_back(std::move(gy));
    c.idx.push_back(std::move(idx));
    c.w.push_back(std::move(w));
    c.routed.push_back(testing::random_expert_weights(cfg.experts_per_rank(), H, kInter, rng));
    c.shared.push_back(testing::random_expert_weights(1, H, kSharedInter, rng));
  }
  return c;
}

// The FP32 chain rule of one layer (double), weights dequantised.
struct Fp32Grads {
  std::vector<std::vector<double>> grad_x, grad_w, r13, r2, s13, s2;
};

// One expert's forward and backward for input x, output gradient go (already weighted), into
// dx, dw13 [2I][H], dw2 [H][I]; returns the expert output o.
std::vector<double> expert_fp32(const std::vector<float>& w13, const std::vector<float>& w2,
                                int64_t H, int64_t I, const std::vector<double>& x,
                                const std::vector<double>& gout, double gscale,
                                std::vector<double>& dx, double* dw13, double* dw2) {
  std::vector<double> g(I), u(I), a(I), o(H, 0.0);
  for (int64_t j = 0; j < I; ++j) {
    double sg = 0, su = 0;
    for (int64_t c = 0; c < H; ++c) {
      sg += x[c] * w13[j * H + c];
      su += x[c] * w13[(I + j) * H + c];
    }
    g[j] = sg;
    u[j] = su;
    a[j] = sg / (1.0 + std::exp(-sg)) * su;
  }
  for (int64_t c = 0; c < H; ++c)
    for (int64_t j = 0; j < I; ++j) o[c] += a[j] * w2[c * I + j];
  std::vector<double> go(H);
  for (int64_t c = 0; c < H; ++c) go[c] = gscale * gout[c];
  for (int64_t j = 0; j < I; ++j) {
    double da = 0;
    for (int64_t c = 0; c < H; ++c) {
      da += go[c] * w2[c * I + j];
      dw2[c * I + j] += go[c] * a[j];
    }
    const double sig = 1.0 / (1.0 + std::exp(-g[j]));
    const double dg = da * u[j] * sig * (1.0 + g[j] * (1.0 - sig)), du = da * g[j] * sig;
    for (int64_t c = 0; c < H; ++c) {
      dx[c] += dg * w13[j * H + c] + du * w13[(I + j) * H + c];
      dw13[j * H + c] += dg * x[c];
      dw13[(I + j) * H + c] += du * x[c];
    }
  }
  return o;
}

Fp32Grads fp32_backward(const Layer& c) {
  const EpConfig& cfg = c.cfg;
  const int R = cfg.num_ranks, K = cfg.top_k, L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden;
  Fp32Grads out;
  std::vector<std::vector<std::vector<float>>> r13(R), r2(R);
  for (int d = 0; d < R; ++d) {
    for (int e = 0; e < L; ++e) {
      r13[d].push_back(dequantize(c.routed[d].w13_ref(e)));
      r2[d].push_back(dequantize(c.routed[d].w2_ref(e)));
    }
    out.r13.emplace_back(L * 2 * kInter * H, 0.0);
    out.r2.emplace_back(L * H * kInter, 0.0);
  }
  for (int s = 0; s < R; ++s) {
    const std::vector<float> s13 = dequantize(c.shared[s].w13_ref(0)),
                             s2 = dequantize(c.shared[s].w2_ref(0));
    out.s13.emplace_back(2 * kSharedInter * H, 0.0);
    out.s2.emplace_back(H * kSharedInter, 0.0);
    out.grad_x.emplace_back(c.tokens[s] * H, 0.0);
    out.grad_w.emplace_back(c.tokens[s] * K, 0.0);
    for (int64_t t = 0; t < c.tokens[s]; ++t) {
      std::vector<double> x(H), gy(H), dx(H, 0.0);
      for (int64_t h = 0; h < H; ++h) {
        x[h] = bf16_bits_to_float(c.x[s][t * H + h]);
        gy[h] = bf16_bits_to_float(c.grad_y[s][t * H + h]);
      }
      for (int k = 0; k < K; ++k) {
        const int32_t e = c.idx[s][t * K + k];
        if (e < 0) continue;
        const int d = e / L, el = e % L;
        const std::vector<double> o = expert_fp32(
            r13[d][el], r2[d][el], H, kInter, x, gy, c.w[s][t * K + k], dx,
            out.r13[d].data() + el * 2 * kInter * H, out.r2[d].data() + el * H * kInter);
        double gw = 0;
        for (int64_t h = 0; h < H; ++h) gw += gy[h] * o[h];
        out.grad_w[s][t * K + k] = gw;
      }
      expert_fp32(s13, s2, H, kSharedInter, x, gy, 1.0, dx, out.s13[s].data(), out.s2[s].data());
      std::copy(dx.begin(), dx.end(), out.grad_x[s].begin() + t * H);
    }
  }
  return out;
}

template <typename T>
double rel(const std::vector<T>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    double g;
    if constexpr (std::is_same_v<T, uint16_t>)
      g = bf16_bits_to_float(got[i]);
    else
      g = got[i];
    num += (g - want[i]) * (g - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(MoeLayerBackward, ReferenceMatchesFp32ChainRule) {
  const uint64_t seed = testing::fresh_seed();
  for (const auto& tokens : {std::vector<int64_t>{48, 37}, std::vector<int64_t>{0, 21}}) {
    const Layer c = make_layer(tokens, seed + tokens[0]);
    const EpConfig& cfg = c.cfg;
    const int R = cfg.num_ranks, K = cfg.top_k;
    const auto batches = c.batches();
    const MoeLayerReference fwd =
        moe_layer_reference(cfg, batches, c.ptrs(c.routed), c.ptrs(c.shared), false, 2);
    const MoeLayerGateUp gu =
        moe_layer_gate_up_reference(cfg, fwd, batches, c.ptrs(c.routed), c.ptrs(c.shared), 2);
    const MoeLayerBackward b = moe_layer_backward_reference(
        cfg, batches, c.ptrs(c.routed), c.ptrs(c.shared), fwd, gu, c.grads(), false, 2);
    const Fp32Grads want = fp32_backward(c);
    for (int r = 0; r < R; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r) + ", tokens " + std::to_string(tokens[r]));
      const double e_x = rel(b.grad_x[r], want.grad_x[r]),
                   e_w = rel(b.grad_topk_w[r], want.grad_w[r]);
      const double e_r13 = rel(b.routed_dw13[r], want.r13[r]),
                   e_r2 = rel(b.routed_dw2[r], want.r2[r]);
      std::printf("rank %d, %lld tokens: rel err grad_x %.3g grad_w %.3g routed dW13 %.3g dW2 %.3g",
                  r, static_cast<long long>(tokens[r]), e_x, e_w, e_r13, e_r2);
      EXPECT_LT(e_r13, 0.1);
      EXPECT_LT(e_r2, 0.1);
      if (tokens[r] > 0) {
        const double e_s13 = rel(b.shared_dw13[r], want.s13[r]),
                     e_s2 = rel(b.shared_dw2[r], want.s2[r]);
        std::printf(" shared dW13 %.3g dW2 %.3g", e_s13, e_s2);
        EXPECT_LT(e_x, 0.1);
        EXPECT_LT(e_w, 0.15);  // dot products of grad_y with the FP8 forward's rows: cancellation
        EXPECT_LT(e_s13, 0.1);
        EXPECT_LT(e_s2, 0.1);
      } else {
        for (float v : b.shared_dw13[r]) ASSERT_EQ(v, 0.0f);
        for (float v : b.shared_dw2[r]) ASSERT_EQ(v, 0.0f);
      }
      std::printf("\n");
      for (int64_t i = 0; i < tokens[r] * K; ++i)
        if (c.idx[r][i] < 0) {
          ASSERT_EQ(b.grad_topk_w[r][i], 0.0f) << "dropped slot " << i;
        }
      // Step 5 exactly: grad_x = bf16(routed + shared).
      std::vector<uint16_t> sum(tokens[r] * cfg.hidden);
      add_bf16_reference(b.grad_x_routed[r].data(), b.grad_x_shared[r].data(),
                         static_cast<int64_t>(sum.size()), sum.data());
      ASSERT_EQ(sum, b.grad_x[r]);
    }
  }
}

TEST(MoeLayerBackward, GateWeightGradientsMatchFiniteDifferences) {
  const uint64_t seed = testing::fresh_seed();
  const Layer c = make_layer({40, 29}, seed);
  const EpConfig& cfg = c.cfg;
  const int K = cfg.top_k;
  const int64_t H = cfg.hidden;
  const auto routed = c.ptrs(c.routed), shared = c.ptrs(c.shared);
  const MoeLayerReference fwd = moe_layer_reference(cfg, c.batches(), routed, shared, false, 2);
  const MoeLayerGateUp gu = moe_layer_gate_up_reference(cfg, fwd, c.batches(), routed, shared, 2);
  const MoeLayerBackward b =
      moe_layer_backward_reference(cfg, c.batches(), routed, shared, fwd, gu, c.grads(), false, 2);
  // loss(w) = sum over every rank's y of grad_y * y; one gate weight of rank s moved by +-eps.
  auto loss = [&](int s, int64_t i, float delta) {
    Layer m = c;
    m.w[s][i] += delta;
    const MoeLayerReference f = moe_layer_reference(cfg, m.batches(), routed, shared, false, 2);
    double l = 0;
    for (int r = 0; r < cfg.num_ranks; ++r)
      for (int64_t j = 0; j < m.tokens[r] * H; ++j)
        l += double(bf16_bits_to_float(c.grad_y[r][j])) * bf16_bits_to_float(f.y[r][j]);
    return l;
  };
  std::vector<double> fd;
  std::vector<float> got;
  PhiloxStream pick(seed, 9);
  for (int s = 0; s < cfg.num_ranks; ++s)
    for (int n = 0; n < 6; ++n) {
      int64_t i = pick.next_u32() % (c.tokens[s] * K);
      while (c.idx[s][i] < 0) i = (i + 1) % (c.tokens[s] * K);
      constexpr float kEps = 1.0f;  // y is linear in the weight: a wide step is exact
      fd.push_back((loss(s, i, kEps) - loss(s, i, -kEps)) / (2.0 * kEps));
      got.push_back(b.grad_topk_w[s][i]);
    }
  const double e = rel(got, fd);
  std::printf("grad_topk_w vs central differences (12 weights): rel err %.3g\n", e);
  EXPECT_LT(e, 0.05);
}

TEST(MoeLayerBackward, BadArgumentsThrow) {
  const Layer c = make_layer({16, 9}, testing::fresh_seed());
  const EpConfig& cfg = c.cfg;
  const auto routed = c.ptrs(c.routed), shared = c.ptrs(c.shared);
  const auto batches = c.batches();
  const MoeLayerReference fwd = moe_layer_reference(cfg, batches, routed, shared, false);
  const MoeLayerGateUp gu = moe_layer_gate_up_reference(cfg, fwd, batches, routed, shared);
  const auto grads = c.grads();
  auto run = [&](const std::vector<std::span<const uint16_t>>& g, const MoeLayerGateUp& u,
                 const std::vector<const ExpertWeightsHost*>& sh) {
    moe_layer_backward_reference(cfg, batches, routed, sh, fwd, u, g, false);
  };
  expect_invalid([&] { run({grads[0]}, gu, shared); }, "1 grad_y for num_ranks=2");
  expect_invalid(
      [&] {
        run({grads[0], grads[1].subspan(1)}, gu, shared);
      },
      "rank 1 grad_y has 2303 values, needs T * H = 2304");
  MoeLayerGateUp short_gu = gu;
  short_gu.routed[0].pop_back();
  expect_invalid([&] { run(grads, short_gu, shared); }, "rank 0 routed gate_up has");
  short_gu = gu;
  short_gu.shared[1].clear();
  expect_invalid([&] { run(grads, short_gu, shared); }, "rank 1 shared gate_up has 0 values");
  expect_invalid([&] { run(grads, gu, {shared[0], nullptr}); }, "null weights of rank 1");
  const std::vector<const ExpertWeightsHost*> two = {&c.routed[0], &c.routed[1]};
  expect_invalid([&] { run(grads, gu, two); }, "4 groups, must be 1");
  std::vector<TokenBatch> fewer = batches;
  fewer[0].tokens -= 1;
  expect_invalid(
      [&] { moe_layer_backward_reference(cfg, fewer, routed, shared, fwd, gu, grads, false); },
      "rank 0 dispatched 16 tokens, its batch has 15");
  EpConfig masked = cfg;
  masked.masked_capacity = cfg.num_ranks * cfg.max_tokens_per_rank;
  const MoeLayerReference mfwd = moe_layer_reference(masked, batches, routed, shared, false);
  expect_invalid(
      [&] {
        moe_layer_backward_reference(masked, batches, routed, shared, mfwd, gu, grads, false);
      },
      "the backward runs the grouped layout, config has masked_capacity=");
}

}  // namespace
}  // namespace fp8moe::comm
