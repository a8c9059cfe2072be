// The CPU references of the latent form's per-head products (src/kernels/mla_absorb_reference.cpp)
// against the plain definition: kv_b dequantised to double, q_nope W_UK[h] and o_lat W_UV[h]^T
// per head in double, then compared with the references' BF16 outputs (one BF16 rounding: 2^-8
// relative a value), and q_pe copied bit for bit. A head or block mixed up breaks it.
// Run: test_kernels --gtest_filter='MlaAbsorbReference*'
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_absorb.h"

namespace fp8moe {
namespace {

TEST(MlaAbsorbReference, MatchesPerHeadProductsInDouble) {
  kernels::MlaAbsorbDims d;
  d.heads = 3;
  d.latent_dim = 256;
  const int64_t T = 5, rows = d.heads * 256, qd = 192, od = d.latent_dim + 64;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> codes(static_cast<size_t>(rows * d.latent_dim));
  for (auto& c : codes) c = float_to_e4m3_bits(normal(rng) * 50.0f);
  std::vector<float> scales(static_cast<size_t>(rows / 128 * d.latent_dim / 128));
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = std::ldexp(1.0f, -static_cast<int>(i % 7));
  const auto w = [&](int64_t r, int64_t j) {
    return static_cast<double>(e4m3_bits_to_float(codes[r * d.latent_dim + j])) *
           scales[(r / 128) * (d.latent_dim / 128) + j / 128];
  };
  std::vector<bf16> q(static_cast<size_t>(T * d.heads * qd)),
      o(static_cast<size_t>(T * d.heads * d.latent_dim));
  for (auto& v : q) v = to_bf16(normal(rng));
  for (auto& v : o) v = to_bf16(normal(rng));
  std::vector<bf16> q_lat(static_cast<size_t>(T * d.heads * od)),
      attn(static_cast<size_t>(T * d.heads * 128));
  kernels::mla_absorb_query_reference(q.data(), T, d, codes.data(), scales.data(), q_lat.data());
  kernels::mla_unabsorb_output_reference(o.data(), T, d, codes.data(), scales.data(), attn.data());
  double num = 0, den = 0, num2 = 0, den2 = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < d.heads; ++h) {
      for (int64_t j = 0; j < d.latent_dim; ++j) {
        double want = 0;
        for (int64_t k = 0; k < 128; ++k)
          want += to_float(q[(t * d.heads + h) * qd + k]) * w(h * 256 + k, j);
        const double got = to_float(q_lat[(t * d.heads + h) * od + j]);
        num += (got - want) * (got - want);
        den += want * want;
      }
      for (int64_t r = 0; r < 64; ++r)
        ASSERT_EQ(q_lat[(t * d.heads + h) * od + d.latent_dim + r].bits,
                  q[(t * d.heads + h) * qd + 128 + r].bits);
      for (int64_t v = 0; v < 128; ++v) {
        double want = 0;
        for (int64_t j = 0; j < d.latent_dim; ++j)
          want += to_float(o[(t * d.heads + h) * d.latent_dim + j]) * w(h * 256 + 128 + v, j);
        const double got = to_float(attn[(t * d.heads + h) * 128 + v]);
        num2 += (got - want) * (got - want);
        den2 += want * want;
      }
    }
  EXPECT_LT(std::sqrt(num / den), 4e-3);
  EXPECT_LT(std::sqrt(num2 / den2), 4e-3);
}

TEST(MlaAbsorbReference, RejectsHeadDimsOtherThan128) {
  kernels::MlaAbsorbDims d;
  d.heads = 1;
  d.value_dim = 64;
  std::vector<bf16> x(1024), y(1024);
  std::vector<uint8_t> c(1 << 16);
  std::vector<float> s(16);
  EXPECT_THROW(kernels::mla_unabsorb_output_reference(x.data(), 1, d, c.data(), s.data(), y.data()),
               Error);
}

}  // namespace
}  // namespace fp8moe
