// expert_ffn_backward_reference (moe/expert_ffn_reference.h) against the FP32 chain rule on the
// same inputs (x and the weights dequantised, gate_up and dy as given, no FP8 in between), and
// its argument checks. The gap is the FP8 quantisation of dy, d_gate_up, h and x^T (E4M3: 2^-4
// relative half-ulp, ~2-3% RMS per element, averaged over the sums) and dh's BF16 rounding:
// a few per cent, bounded at 8e-2 (a wrong expert, transpose or scale gives O(1)).
// Run: build/tests/test_moe --gtest_filter='ExpertFfnBackward*'
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/moe/expert_ffn_reference.h"

namespace fp8moe {
namespace {

double rel(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(ExpertFfnBackwardReference, MatchesFp32ChainRule) {
  const int64_t G = 4, H = 256, I = 256, I2 = 2 * I;
  const int64_t counts[4] = {0, 1, 130, 300};
  std::vector<int32_t> layout;
  std::vector<int64_t> expert_rows;
  for (int64_t e = 0; e < G; ++e) {
    const int64_t padded = (counts[e] + 127) / 128 * 128;
    expert_rows.push_back(padded);
    for (int64_t i = 0; i < padded; ++i) layout.push_back(i < counts[e] ? int32_t(e) : -1);
  }
  const int64_t R = static_cast<int64_t>(layout.size());
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.05f, 2.5f);
  std::vector<float> x(R * H), gate(G * I * H), up(G * I * H), down(G * H * I), ws(R);
  for (float& v : x) v = normal(rng);
  for (float& v : gate) v = normal(rng) / 16.0f;
  for (float& v : up) v = normal(rng) / 16.0f;
  for (float& v : down) v = normal(rng) / 16.0f;
  for (float& v : ws) v = uni(rng);
  const ExpertWeightsHost w = quantize_expert_weights(gate.data(), up.data(), down.data(), G, H, I);
  QuantizedMatrix xq = quantize(x.data(), R, H, H, ScaleGranularity::k1x128);
  std::vector<bf16> gate_up(R * I2), dy(R * H);
  for (auto& v : gate_up) v = to_bf16(normal(rng));
  for (auto& v : dy) v = to_bf16(normal(rng));
  for (int64_t r = 0; r < R; ++r) {  // padding rows: NaN everywhere the reference must not read
    if (layout[r] >= 0) continue;
    std::fill_n(xq.codes.begin() + r * H, H, uint8_t{0x7F});
    std::fill_n(xq.scales.begin() + r * (H / 128), H / 128, std::nanf(""));
    std::fill_n(gate_up.begin() + r * I2, I2, bf16{0x7FC0});
    std::fill_n(dy.begin() + r * H, H, bf16{0x7FC0});
  }
  std::vector<float> dw13_init(G * I2 * H), dw2_init(G * H * I);
  for (float& v : dw13_init) v = normal(rng);
  for (float& v : dw2_init) v = normal(rng);
  std::vector<bf16> dx(R * H, bf16{0xFFFF});
  std::vector<float> dw13 = dw13_init, dw2 = dw2_init, drs(R, std::nanf(""));
  expert_ffn_backward_reference(xq.ref(), layout.data(), expert_rows, w, gate_up.data(), dy.data(),
                                ws.data(), false, dx.data(), dw13.data(), dw2.data(), drs.data());

  // FP32 (double) chain rule on the dequantised x and weights.
  std::vector<double> gx, wx, gdrs, wdrs, want13(G * I2 * H, 0.0), want2(G * H * I, 0.0);
  for (int64_t r = 0; r < R; ++r) {
    if (layout[r] < 0) {
      EXPECT_EQ(dx[r * H].bits, 0xFFFF) << "padding row " << r << " of dx written";
      EXPECT_EQ(drs[r], 0.0f);
      continue;
    }
    const int64_t e = layout[r];
    const Fp8MatrixRef w13 = w.w13_ref(e), w2 = w.w2_ref(e);
    std::vector<double> dh(I, 0.0), dgu(I2), h(I);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t c = 0; c < H; ++c) dh[i] += to_float(dy[r * H + c]) * w2.value(c, i);
    double drs_want = 0;
    for (int64_t i = 0; i < I; ++i) {
      const double g = to_float(gate_up[r * I2 + i]), u = to_float(gate_up[r * I2 + I + i]);
      const double s = 1 / (1 + std::exp(-g)), silu = g * s;
      dgu[i] = dh[i] * ws[r] * u * s * (1 + g * (1 - s));
      dgu[I + i] = dh[i] * ws[r] * silu;
      h[i] = silu * u * ws[r];
      drs_want += dh[i] * silu * u;
    }
    gdrs.push_back(drs[r]);
    wdrs.push_back(drs_want);
    for (int64_t c = 0; c < H; ++c) {
      double want = 0;
      for (int64_t j = 0; j < I2; ++j) want += dgu[j] * w13.value(j, c);
      gx.push_back(to_float(dx[r * H + c]));
      wx.push_back(want);
    }
    for (int64_t c = 0; c < H; ++c)
      for (int64_t i = 0; i < I; ++i)
        want2[e * H * I + c * I + i] += to_float(dy[r * H + c]) * h[i];
    for (int64_t j = 0; j < I2; ++j)
      for (int64_t c = 0; c < H; ++c)
        want13[e * I2 * H + j * H + c] += dgu[j] * xq.ref().value(r, c);
  }
  // The increments: dw - init against the chain rule.
  std::vector<double> g13(want13.size()), g2(want2.size());
  for (size_t i = 0; i < g13.size(); ++i) g13[i] = double(dw13[i]) - dw13_init[i];
  for (size_t i = 0; i < g2.size(); ++i) g2[i] = double(dw2[i]) - dw2_init[i];
  const double e_dx = rel(gx, wx), e13 = rel(g13, want13), e2 = rel(g2, want2),
               e_rs = rel(gdrs, wdrs);
  std::printf(
      "expert_ffn_backward_reference vs FP32: dx %.3e dW13 %.3e dW2 %.3e d_row_scale %.3e\n", e_dx,
      e13, e2, e_rs);
  EXPECT_LT(e_dx, 8e-2);
  EXPECT_LT(e13, 8e-2);
  EXPECT_LT(e2, 8e-2);
  EXPECT_LT(e_rs, 8e-2);
  // Expert 0 (no rows): its weight gradients stay as they were.
  for (int64_t i = 0; i < I2 * H; ++i) ASSERT_EQ(dw13[i], dw13_init[i]);
  for (int64_t i = 0; i < H * I; ++i) ASSERT_EQ(dw2[i], dw2_init[i]);
}

TEST(ExpertFfnBackwardReference, BadArgumentsThrow) {
  const int64_t G = 2, H = 128, I = 128;
  std::vector<float> gate(G * I * H, 0.1f), up(G * I * H, 0.1f), down(G * H * I, 0.1f);
  const ExpertWeightsHost w = quantize_expert_weights(gate.data(), up.data(), down.data(), G, H, I);
  std::vector<float> x(256 * H, 1.0f);
  const QuantizedMatrix xq = quantize(x.data(), 256, H, H, ScaleGranularity::k1x128);
  std::vector<int32_t> layout(256, 0);
  std::vector<bf16> gu(256 * 2 * I), dy(256 * H), dx(256 * H);
  std::vector<float> d13(G * 2 * I * H), d2(G * H * I);
  auto call = [&](std::vector<int64_t> rows) {
    expert_ffn_backward_reference(xq.ref(), layout.data(), rows, w, gu.data(), dy.data(), nullptr,
                                  false, dx.data(), d13.data(), d2.data(), nullptr);
  };
  EXPECT_THROW(call({128, 0}), Error);    // sums to 128, x has 256 rows
  EXPECT_THROW(call({100, 156}), Error);  // not multiples of 128
  EXPECT_THROW(call({256}), Error);       // one count for two experts
  EXPECT_THROW(call({128, 128}), Error);  // rows 128.. name expert 0 inside expert 1
  EXPECT_NO_THROW(call({256, 0}));
}

}  // namespace
}  // namespace fp8moe
