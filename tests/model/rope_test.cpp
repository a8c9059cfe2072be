// RoPE tables and YaRN scaling (DeepSeek-V3's rope_scaling), against hand-computed values.
#include <gtest/gtest.h>

#include <cmath>

#include "fp8moe/model/ops.h"

namespace fp8moe {
namespace {

RopeScaling v3_yarn() {
  RopeScaling s;
  s.type = "yarn";
  s.factor = 40;
  s.beta_fast = 32;
  s.beta_slow = 1;
  s.mscale = 1;
  s.mscale_all_dim = 1;
  s.original_max_position_embeddings = 4096;
  return s;
}

TEST(Rope, PlainFrequenciesAndUnitMagnitude) {
  const auto f = rope_inverse_frequencies(64, 10000.0, {});
  ASSERT_EQ(f.size(), 32u);
  EXPECT_DOUBLE_EQ(f[0], 1.0);
  EXPECT_NEAR(f[16], std::pow(10000.0, -0.5), 1e-15);
  const RopeTable t = make_rope_table(64, 8, 10000.0);
  for (size_t i = 0; i < t.cos.size(); ++i)
    EXPECT_NEAR(t.cos[i] * t.cos[i] + t.sin[i] * t.sin[i], 1.0f, 1e-6f);
}

TEST(Rope, YarnFrequenciesOfTheV3Config) {
  // qk_rope_head_dim 64, theta 10000, original context 4096: the correction range is
  // [floor(64 ln(4096 / 64 pi) / 2 ln 1e4), ceil(64 ln(4096 / 2 pi) / 2 ln 1e4)]
  // = [floor(10.47), ceil(22.51)] = [10, 23].
  const auto plain = rope_inverse_frequencies(64, 10000.0, {});
  const auto yarn = rope_inverse_frequencies(64, 10000.0, v3_yarn());
  for (int i = 0; i <= 10; ++i) EXPECT_DOUBLE_EQ(yarn[i], plain[i]) << i;         // extrapolated
  for (int i = 23; i < 32; ++i) EXPECT_NEAR(yarn[i], plain[i] / 40, 1e-18) << i;  // interpolated
  const double ramp = (16.0 - 10.0) / 13.0;
  EXPECT_NEAR(yarn[16], plain[16] / 40 * ramp + plain[16] * (1 - ramp), 1e-15);
}

TEST(Rope, YarnAttentionScaleAndMagnitude) {
  // V3: 1/sqrt(128 + 64) * (0.1 ln 40 + 1)^2 = 0.0721688 * 1.3688879^2.
  EXPECT_NEAR(attention_softmax_scale(192, v3_yarn()), 0.13523, 1e-5);
  EXPECT_NEAR(attention_softmax_scale(192, {}), 1.0 / std::sqrt(192.0), 1e-15);
  EXPECT_DOUBLE_EQ(yarn_mscale(1.0, 5.0), 1.0);
  // mscale == mscale_all_dim leaves cos/sin at unit magnitude; otherwise their ratio scales them.
  const RopeTable unit = make_rope_table(64, 4, 10000.0, v3_yarn());
  EXPECT_NEAR(unit.cos[64] * unit.cos[64] + unit.sin[64] * unit.sin[64], 1.0f, 1e-6f);
  RopeScaling s = v3_yarn();
  s.mscale = 2;
  const RopeTable scaled = make_rope_table(64, 4, 10000.0, s);
  const double m = (0.2 * std::log(40.0) + 1) / (0.1 * std::log(40.0) + 1);  // 1.26949
  EXPECT_NEAR(std::hypot(scaled.cos[64], scaled.sin[64]), m, 1e-6);
}

}  // namespace
}  // namespace fp8moe
