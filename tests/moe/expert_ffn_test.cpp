// The experts' FP8 FFN reference (moe/expert_ffn_reference.h) against a plain FP32 FFN on the
// same weights and inputs (what FP8 quantisation of x, the weights and h costs), the weight
// helper's layout against fp8moe::quantize of each projection, and the errors both raise.
// Also a CPU estimate of the GPU's deviation from the reference: the reference with a
// Hopper-tensor-core accumulator (14 bits, truncating, inside each 128-K window) against the
// default one (docs/moe/README.md, "The experts' FFN on the GPU", uses the number).
#include "fp8moe/moe/expert_ffn_reference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "../support/expect_invalid.h"
#include "fp8moe/core/error.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe {
namespace {

struct Problem {
  int64_t G, H, I, rows;
  std::vector<float> x, gate, up, down, row_scale;
  std::vector<int32_t> layout;  // [rows], -1 padding
};

// rows of experts {0, 1, 2, ...} in 128-row blocks with the given counts (padding after each).
Problem make_problem(int64_t H, int64_t I, const std::vector<int64_t>& counts, uint64_t seed) {
  Problem p;
  p.G = static_cast<int64_t>(counts.size());
  p.H = H;
  p.I = I;
  for (int64_t e = 0; e < p.G; ++e) {
    const int64_t padded = (counts[e] + 127) / 128 * 128;
    for (int64_t i = 0; i < padded; ++i) p.layout.push_back(i < counts[e] ? int32_t(e) : -1);
  }
  p.rows = static_cast<int64_t>(p.layout.size());
  PhiloxStream rng(seed, 0);
  p.x.resize(p.rows * H);
  for (int64_t r = 0; r < p.rows; ++r) {
    const float mag = std::exp2(rng.uniform(-4.0f, 4.0f));  // rows of different magnitudes
    for (int64_t c = 0; c < H; ++c) p.x[r * H + c] = mag * rng.normal();
  }
  auto fill = [&](std::vector<float>& w, int64_t n, float sd) {
    w.resize(n);
    for (float& v : w) v = sd * rng.normal();
  };
  fill(p.gate, p.G * I * H, 1.0f / std::sqrt(float(H)));
  fill(p.up, p.G * I * H, 1.0f / std::sqrt(float(H)));
  fill(p.down, p.G * H * I, 1.0f / std::sqrt(float(I)));
  p.row_scale.resize(p.rows);
  for (float& v : p.row_scale) v = rng.uniform(0.05f, 2.5f);
  return p;
}

// The FFN in FP32 (double sums) from the unquantised x and weights.
std::vector<float> fp32_ffn(const Problem& p, bool with_row_scale) {
  const int64_t H = p.H, I = p.I;
  std::vector<float> y(p.rows * H, 0.0f), h(I);
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t e = p.layout[r];
    if (e < 0) continue;
    const float* x = p.x.data() + r * H;
    for (int64_t j = 0; j < I; ++j) {
      double g = 0, u = 0;
      const float* wg = p.gate.data() + (e * I + j) * H;
      const float* wu = p.up.data() + (e * I + j) * H;
      for (int64_t c = 0; c < H; ++c) {
        g += double(x[c]) * wg[c];
        u += double(x[c]) * wu[c];
      }
      h[j] = static_cast<float>(g / (1.0 + std::exp(-g)) * u *
                                (with_row_scale ? p.row_scale[r] : 1.0f));
    }
    for (int64_t c = 0; c < H; ++c) {
      const float* wd = p.down.data() + (e * H + c) * I;
      double s = 0;
      for (int64_t j = 0; j < I; ++j) s += double(h[j]) * wd[j];
      y[r * H + c] = static_cast<float>(s);
    }
  }
  return y;
}

// ||got - want|| / ||want|| over the real rows.
double rel_error(const Problem& p, const std::vector<bf16>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    if (p.layout[r] < 0) continue;
    for (int64_t c = 0; c < p.H; ++c) {
      const double w = want[r * p.H + c], e = to_float(got[r * p.H + c]) - w;
      num += e * e;
      den += w * w;
    }
  }
  return std::sqrt(num / den);
}

std::vector<float> to_floats(const std::vector<bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}

using test::expect_invalid;

constexpr uint16_t kPoison = 0xFFFF;

TEST(ExpertFfn, ReferenceMatchesFp32FfnWithinFp8Quantisation) {
  struct Shape {
    int64_t H, I;
  };
  for (const Shape s : {Shape{256, 256}, Shape{384, 512}, Shape{1024, 256}}) {
    const Problem p = make_problem(s.H, s.I, {0, 1, 130, 60}, 7 + s.H + s.I);
    const ExpertWeightsHost w =
        quantize_expert_weights(p.gate.data(), p.up.data(), p.down.data(), p.G, p.H, p.I);
    const QuantizedMatrix xq = quantize(p.x.data(), p.rows, p.H, p.H, ScaleGranularity::k1x128);
    for (const bool scaled : {false, true}) {
      std::vector<bf16> y(p.rows * p.H, bf16{kPoison});
      expert_ffn_reference(xq.ref(), p.layout.data(), w, scaled ? p.row_scale.data() : nullptr,
                           false, y.data());
      const double err = rel_error(p, y, fp32_ffn(p, scaled));
      std::printf("expert_ffn_reference H=%lld I=%lld rows=%lld row_scale=%d: vs FP32 FFN %.4f\n",
                  (long long)s.H, (long long)s.I, (long long)p.rows, scaled, err);
      EXPECT_LT(err, 0.08) << "H=" << s.H << " I=" << s.I;
      for (int64_t r = 0; r < p.rows; ++r)
        for (int64_t c = 0; c < p.H; ++c) {
          const uint16_t b = y[r * p.H + c].bits;
          if (p.layout[r] < 0)
            ASSERT_EQ(b, kPoison) << "padding row " << r << " written";
          else
            ASSERT_TRUE(std::isfinite(bf16_bits_to_float(b))) << "row " << r << " col " << c;
        }
    }
  }
}

TEST(ExpertFfn, ReferenceReadsMnMajorScalesAndPow2) {
  const Problem p = make_problem(256, 384, {5, 0, 140}, 99);
  const ExpertWeightsHost w =
      quantize_expert_weights(p.gate.data(), p.up.data(), p.down.data(), p.G, p.H, p.I);
  const QuantizedMatrix xq = quantize(p.x.data(), p.rows, p.H, p.H, ScaleGranularity::k1x128);
  std::vector<bf16> a(p.rows * p.H, bf16{kPoison}), b = a, c = a;
  expert_ffn_reference(xq.ref(), p.layout.data(), w, nullptr, false, a.data());
  // The same x with its scales M-major [H/128][pad(rows)] (what the GPU reads).
  const std::vector<float> mn = scales_mn_major(xq);
  Fp8MatrixRef xm = xq.ref();
  xm.scales = mn.data();
  xm.scale_row_stride = 1;
  xm.scale_col_stride = padded_rows(p.rows);
  expert_ffn_reference(xm, p.layout.data(), w, nullptr, false, b.data());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i].bits, b[i].bits) << "element " << i;
  // pow2 scales of h: a different rounding, the same FFN to FP8 accuracy.
  expert_ffn_reference(xq.ref(), p.layout.data(), w, nullptr, true, c.data(), {}, 2);
  const double err = rel_error(p, c, to_floats(a));
  std::printf("pow2 h scales vs plain: %.4f\n", err);
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 0.05);
}

// What the GPU's tensor cores may change: the up and down GEMMs with a 14-bit truncating
// accumulator inside each 128-K window against the default (FP32, nearest) one. The GPU test's
// bound on ||y_gpu - ref|| / ||ref|| rests on this number (see docs/moe/README.md).
TEST(ExpertFfn, TensorCoreAccumulatorEstimate) {
  const Problem p = make_problem(256, 256, {0, 1, 130, 300}, 5);
  const ExpertWeightsHost w =
      quantize_expert_weights(p.gate.data(), p.up.data(), p.down.data(), p.G, p.H, p.I);
  const QuantizedMatrix xq = quantize(p.x.data(), p.rows, p.H, p.H, ScaleGranularity::k1x128);
  std::vector<bf16> ref(p.rows * p.H, bf16{kPoison}), tc = ref;
  expert_ffn_reference(xq.ref(), p.layout.data(), w, nullptr, false, ref.data());
  expert_ffn_reference(xq.ref(), p.layout.data(), w, nullptr, false, tc.data(),
                       AccumulatorModel::hopper_tensor_core(128), 2);
  const double err = rel_error(p, tc, to_floats(ref));
  int64_t differ = 0, real = 0;
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.H && p.layout[r] >= 0; ++c, ++real)
      differ += ref[r * p.H + c].bits != tc[r * p.H + c].bits;
  std::printf("14-bit truncating windows vs reference: rel %.3e, %lld of %lld outputs differ\n",
              err, (long long)differ, (long long)real);
  EXPECT_LT(err, 2e-2);
}

TEST(ExpertFfn, WeightLayoutIsGateThenUpPerExpert) {
  const int64_t G = 3, H = 256, I = 384;
  const Problem p = make_problem(H, I, {1, 1, 1}, 3);
  const ExpertWeightsHost w = quantize_expert_weights(p.gate.data(), p.up.data(), p.down.data(), G,
                                                      H, I, QuantizeOptions{true});
  EXPECT_EQ(w.groups, G);
  EXPECT_EQ(w.hidden, H);
  EXPECT_EQ(w.inter, I);
  ASSERT_EQ(w.w13.size(), size_t(G * 2 * I * H));
  ASSERT_EQ(w.s13.size(), size_t(G * (2 * I / 128) * (H / 128)));
  ASSERT_EQ(w.w2.size(), size_t(G * H * I));
  ASSERT_EQ(w.s2.size(), size_t(G * (H / 128) * (I / 128)));
  const QuantizeOptions pow2{true};
  for (int64_t e = 0; e < G; ++e) {
    const QuantizedMatrix g =
        quantize(p.gate.data() + e * I * H, I, H, H, ScaleGranularity::k128x128, pow2);
    const QuantizedMatrix u =
        quantize(p.up.data() + e * I * H, I, H, H, ScaleGranularity::k128x128, pow2);
    const QuantizedMatrix d =
        quantize(p.down.data() + e * H * I, H, I, I, ScaleGranularity::k128x128, pow2);
    const Fp8MatrixRef w13 = w.w13_ref(e), w2 = w.w2_ref(e);
    ASSERT_EQ(w13.rows, 2 * I);
    ASSERT_EQ(w13.cols, H);
    ASSERT_EQ(w2.rows, H);
    ASSERT_EQ(w2.cols, I);
    for (int64_t r = 0; r < I; ++r)
      for (int64_t c = 0; c < H; ++c) {
        ASSERT_EQ(w13.codes[r * H + c], g.codes[r * H + c]) << "gate e" << e << " " << r;
        ASSERT_EQ(w13.codes[(I + r) * H + c], u.codes[r * H + c]) << "up e" << e << " " << r;
        ASSERT_EQ(w13.scale(r, c), g.ref().scale(r, c));
        ASSERT_EQ(w13.scale(I + r, c), u.ref().scale(r, c));
      }
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < I; ++c) {
        ASSERT_EQ(w2.codes[r * I + c], d.codes[r * I + c]) << "down e" << e << " " << r;
        ASSERT_EQ(w2.scale(r, c), d.ref().scale(r, c));
      }
    // The flat arrays: expert e's blocks at e * (2I/128) * (H/128) (s13), e * (H/128) * (I/128).
    EXPECT_EQ(w.s13[e * (2 * I / 128) * (H / 128) + (I / 128) * (H / 128)], u.scales[0]);
    EXPECT_EQ(w.s2[e * (H / 128) * (I / 128)], d.scales[0]);
  }
}

TEST(ExpertFfn, BadShapesAndInputsAreRejected) {
  const std::vector<float> a(2 * 256 * 256, 0.5f);
  const float* v = a.data();
  expect_invalid([&] { quantize_expert_weights(v, v, v, 1, 200, 256); }, "hidden=200");
  expect_invalid([&] { quantize_expert_weights(v, v, v, 1, 256, 192); }, "inter=192");
  expect_invalid([&] { quantize_expert_weights(v, v, v, 0, 256, 256); }, "groups=0");
  expect_invalid([&] { quantize_expert_weights(v, nullptr, v, 1, 256, 256); }, "up null");
  std::vector<float> bad = a;
  bad[128 * 256 + 3 * 256 + 7] = std::numeric_limits<float>::quiet_NaN();  // expert 1's row 3
  expect_invalid([&] { quantize_expert_weights(v, bad.data(), v, 2, 256, 128); }, "up of expert 1");

  const ExpertWeightsHost w = quantize_expert_weights(v, v, v, 2, 256, 128);
  expect_invalid([&] { (void)w.w13_ref(2); }, "expert 2 of 2");
  const std::vector<float> xs(128 * 384, 1.0f);
  const QuantizedMatrix x384 = quantize(xs.data(), 128, 384, 384, ScaleGranularity::k1x128);
  std::vector<int32_t> layout(128, 0);
  std::vector<bf16> y(128 * 384);
  expect_invalid(
      [&] { expert_ffn_reference(x384.ref(), layout.data(), w, nullptr, false, y.data()); },
      "x has 384 columns, hidden is 256");
  const QuantizedMatrix x = quantize(xs.data(), 128, 256, 256, ScaleGranularity::k1x128);
  layout[5] = 2;
  expect_invalid([&] { expert_ffn_reference(x.ref(), layout.data(), w, nullptr, false, y.data()); },
                 "row 5 names expert 2 of 2");
  ExpertWeightsHost cut = w;
  cut.s2.pop_back();
  layout[5] = 0;
  expect_invalid(
      [&] { expert_ffn_reference(x.ref(), layout.data(), cut, nullptr, false, y.data()); },
      "weight arrays do not match");
}

}  // namespace
}  // namespace fp8moe
