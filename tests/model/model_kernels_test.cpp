// The CPU references of model/model_kernels_gpu.h: they are the CPU model's meaning (ops.h
// rope_apply on widened BF16 values; embed_rows / embed_backward's order) and
// cross_entropy_sum_reference is a fixed-order sum equal to the plain sum to rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/model/model_kernels_gpu.h"
#include "fp8moe/model/ops.h"

namespace fp8moe {
namespace {

TEST(ModelKernelsReference, RopeIsOpsRopeOnWidenedValues) {
  const RopeScaling yarn{"yarn", 40.0, 32.0, 1.0, 1.0, 1.0, 4096};
  const RopeTable table = make_rope_table(64, 100, 10000.0, yarn);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t T = 7, H = 3, ld_head = 80, ld_token = H * ld_head;
  std::vector<bf16> x(T * ld_token);
  for (auto& v : x) v = to_bf16(normal(rng));
  std::vector<int32_t> pos = {0, 99, 5, 5, 17, 1, 64};
  std::vector<bf16> y = x;
  rope_apply_bf16_reference(table, y.data() + 16, T, H, ld_token, ld_head, pos.data(), false);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = t * ld_token + h * ld_head;
      for (int64_t i = 0; i < 16; ++i) EXPECT_EQ(y[base + i].bits, x[base + i].bits);
      std::vector<float> f(64);
      for (int64_t i = 0; i < 64; ++i) f[i] = to_float(x[base + 16 + i]);
      rope_apply(table, f.data(), pos[t], false);
      for (int64_t i = 0; i < 64; ++i) EXPECT_EQ(y[base + 16 + i].bits, to_bf16(f[i]).bits);
    }
  // Position 0 with no scaling magnitude: cos 1, sin 0 -> unchanged.
  const RopeTable plain = make_rope_table(8, 2, 10000.0);
  std::vector<bf16> z = {to_bf16(1.5f), to_bf16(-2.0f), to_bf16(3.0f), to_bf16(0.25f),
                         to_bf16(1.0f), to_bf16(2.0f),  to_bf16(4.0f), to_bf16(8.0f)};
  const std::vector<bf16> z0 = z;
  const int32_t p0 = 0;
  rope_apply_bf16_reference(plain, z.data(), 1, 1, 8, 8, &p0, true);
  for (size_t i = 0; i < z.size(); ++i) EXPECT_EQ(z[i].bits, z0[i].bits);
  const int32_t bad = 2;
  EXPECT_THROW(rope_apply_bf16_reference(plain, z.data(), 1, 1, 8, 8, &bad, false), Error);
}

TEST(ModelKernelsReference, EmbeddingGatherAndTokenOrderScatter) {
  const int64_t V = 5, Hd = 4, T = 6;
  std::vector<float> table(V * Hd);
  for (size_t i = 0; i < table.size(); ++i) table[i] = 0.1f * static_cast<float>(i) + 1e-3f;
  const std::vector<int32_t> ids = {4, 0, 4, 2, 4, 1};
  std::vector<bf16> out(T * 8);
  embedding_forward_reference(table.data(), V, Hd, ids.data(), T, out.data(), 8);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < Hd; ++c)
      EXPECT_EQ(out[t * 8 + c].bits, to_bf16(table[ids[t] * Hd + c]).bits);
  // Backward: id 4 gets ((g + d0) + d2) + d4 in token order, with values where order matters.
  std::vector<bf16> dy(T * Hd, to_bf16(0.0f));
  for (int64_t c = 0; c < Hd; ++c) {
    dy[0 * Hd + c] = to_bf16(1.0f);
    dy[2 * Hd + c] = to_bf16(std::ldexp(1.0f, -24));
    dy[4 * Hd + c] = to_bf16(std::ldexp(1.0f, -24));
  }
  std::vector<float> g(V * Hd, 0.0f);
  embedding_backward_reference(dy.data(), Hd, ids.data(), T, V, Hd, g.data());
  for (int64_t c = 0; c < Hd; ++c)
    EXPECT_EQ(g[4 * Hd + c], 1.0f);  // 1 + 2^-24 + 2^-24 = 1 in order
  const std::vector<int32_t> bad = {0, 5};
  EXPECT_THROW(embedding_backward_reference(dy.data(), Hd, bad.data(), 2, V, Hd, g.data()), Error);
  EXPECT_THROW(embedding_forward_reference(table.data(), V, Hd, bad.data(), 2, out.data(), 8),
               Error);
}

TEST(ModelKernelsReference, LossSumFixedOrder) {
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<float> u(0.0f, 12.0f);
  for (const int64_t rows : {0, 1, 31, 1024, 5000}) {
    std::vector<float> l(rows);
    double plain = 0;
    for (auto& v : l) {
      v = u(rng);
      plain += v;
    }
    const double s = cross_entropy_sum_reference(l.data(), rows);
    EXPECT_NEAR(s, plain, 1e-9 * std::max(1.0, plain)) << rows;
  }
  const std::vector<float> one = {2.5f};
  EXPECT_EQ(cross_entropy_sum_reference(one.data(), 1), 2.5);
}

}  // namespace
}  // namespace fp8moe
