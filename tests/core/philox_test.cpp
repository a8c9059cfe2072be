#include "fp8moe/core/philox.h"

#include <gtest/gtest.h>

#include <set>

namespace fp8moe {
namespace {

// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
TEST(Philox, MatchesRandom123KnownAnswers) {
  struct Kat {
    PhiloxBlock ctr;
    uint32_t k0, k1;
    PhiloxBlock expect;
  };
  const Kat kats[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       0xffffffffu,
       0xffffffffu,
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       0xa4093822u,
       0x299f31d0u,
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const auto& kat : kats) {
    const PhiloxBlock out = philox4x32_10(kat.ctr, kat.k0, kat.k1);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out.x[i], kat.expect.x[i]) << "word " << i;
  }
}

TEST(Philox, ElementsAreAPureFunctionOfSeedStreamIndex) {
  PhiloxStream s(42, 7);
  for (uint64_t i = 0; i < 100; ++i) EXPECT_EQ(s.next_u32(), philox_u32(42, 7, i));
  EXPECT_NE(philox_u32(42, 7, 0), philox_u32(42, 8, 0));
  EXPECT_NE(philox_u32(42, 7, 0), philox_u32(43, 7, 0));
  PhiloxStream resumed(42, 7, 50);
  EXPECT_EQ(resumed.next_u32(), philox_u32(42, 7, 50));
}

TEST(Philox, UniformIsInUnitIntervalAndNormalHasUnitMoments) {
  std::set<float> distinct;
  double sum = 0, sq = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const float u = philox_uniform(1, 2, i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    distinct.insert(u);
    const double z = philox_normal(1, 2, i);
    ASSERT_TRUE(std::isfinite(z));
    sum += z;
    sq += z * z;
  }
  EXPECT_GT(distinct.size(), 19900u);
  EXPECT_NEAR(sum / n, 0.0, 0.03);
  EXPECT_NEAR(sq / n, 1.0, 0.05);
}

}  // namespace
}  // namespace fp8moe
