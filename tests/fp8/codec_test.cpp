#include "fp8moe/fp8/codec.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace fp8moe {
namespace {

// Independent decoder written from the format definitions (double arithmetic).
double minifloat_value(uint8_t code, int exp_bits, int man_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int e = (code >> man_bits) & ((1 << exp_bits) - 1);
  const int m = code & ((1 << man_bits) - 1);
  const double sign = (code & 0x80) ? -1.0 : 1.0;
  if (e == 0) return sign * std::ldexp(m, 1 - bias - man_bits);
  return sign * std::ldexp(1.0 + std::ldexp(m, -man_bits), e - bias);
}

bool is_e4m3_nan(uint8_t c) {
  return (c & 0x7F) == 0x7F;
}
bool is_e5m2_nonfinite(uint8_t c) {
  return (c & 0x7C) == 0x7C;
}

TEST(E4M3, AllCodesDecodeAndRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const float v = e4m3_bits_to_float(code);
    if (is_e4m3_nan(code)) {
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(float_to_e4m3_bits(v), code) << "NaN keeps its sign";
      continue;
    }
    EXPECT_EQ(static_cast<double>(v), minifloat_value(code, 4, 3)) << "code " << c;
    EXPECT_EQ(float_to_e4m3_bits(v, Overflow::kSaturate), code) << "code " << c;
    EXPECT_EQ(float_to_e4m3_bits(v, Overflow::kNonFinite), code) << "code " << c;
  }
  EXPECT_EQ(e4m3_bits_to_float(0x7E), 448.0f);
  EXPECT_EQ(e4m3_bits_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3_bits_to_float(0x08), std::ldexp(1.0f, -6));  // smallest normal
}

// Every tie between neighbouring codes rounds to the even code; just off the tie, to nearest.
template <typename Encode>
void check_all_ties(int exp_bits, int man_bits, uint8_t max_code, Encode encode) {
  for (int c = 0; c < max_code; ++c) {
    for (const double sign : {1.0, -1.0}) {
      const double lo = minifloat_value(static_cast<uint8_t>(c), exp_bits, man_bits);
      const double hi = minifloat_value(static_cast<uint8_t>(c + 1), exp_bits, man_bits);
      const float mid = static_cast<float>(sign * (lo + hi) / 2);
      ASSERT_EQ(static_cast<double>(mid), sign * (lo + hi) / 2) << "midpoint exact in float";
      const uint8_t even = static_cast<uint8_t>((c % 2 == 0) ? c : c + 1);
      const uint8_t s = sign < 0 ? 0x80 : 0;
      EXPECT_EQ(encode(mid), s | even) << "tie between codes " << c << " and " << c + 1;
      const float below = std::nextafter(mid, 0.0f);
      const float above = std::nextafter(mid, sign > 0 ? INFINITY : -INFINITY);
      EXPECT_EQ(encode(below), s | c) << "just below the tie after code " << c;
      EXPECT_EQ(encode(above), s | (c + 1)) << "just above the tie after code " << c;
    }
  }
}

TEST(E4M3, EveryRoundingTieGoesToEven) {
  check_all_ties(4, 3, 0x7E, [](float x) { return float_to_e4m3_bits(x); });
}

TEST(E4M3, OverflowSaturatesOrGivesNaN) {
  EXPECT_EQ(float_to_e4m3_bits(449.0f, Overflow::kNonFinite), 0x7E);  // rounds down to 448
  EXPECT_EQ(float_to_e4m3_bits(464.0f, Overflow::kNonFinite), 0x7E);  // tie: even is 448
  EXPECT_EQ(float_to_e4m3_bits(std::nextafter(464.0f, 1e9f), Overflow::kNonFinite), 0x7F);
  EXPECT_EQ(float_to_e4m3_bits(std::nextafter(464.0f, 1e9f), Overflow::kSaturate), 0x7E);
  EXPECT_EQ(float_to_e4m3_bits(1e30f, Overflow::kSaturate), 0x7E);
  EXPECT_EQ(float_to_e4m3_bits(-1e30f, Overflow::kSaturate), 0xFE);
  EXPECT_EQ(float_to_e4m3_bits(-1e30f, Overflow::kNonFinite), 0xFF);
  EXPECT_EQ(float_to_e4m3_bits(INFINITY, Overflow::kSaturate), 0x7E);
  EXPECT_EQ(float_to_e4m3_bits(-INFINITY, Overflow::kNonFinite), 0xFF);
  EXPECT_TRUE(is_e4m3_nan(float_to_e4m3_bits(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(is_e4m3_nan(
      float_to_e4m3_bits(std::numeric_limits<float>::quiet_NaN(), Overflow::kSaturate)));
}

TEST(E4M3, SubnormalsAndUnderflow) {
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.0f, -10)), 0x00);  // half the step: tie -> 0
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(1.5f, -10)), 0x01);  // 0.75 step -> 1
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(3.0f, -10)), 0x02);  // 1.5 steps: tie -> 2
  EXPECT_EQ(float_to_e4m3_bits(std::ldexp(7.5f, -9)), 0x08);   // rounds up to min normal
  EXPECT_EQ(float_to_e4m3_bits(1e-30f), 0x00);
  EXPECT_EQ(float_to_e4m3_bits(-1e-30f), 0x80);
  EXPECT_EQ(float_to_e4m3_bits(std::numeric_limits<float>::denorm_min()), 0x00);
}

TEST(E4M3, BranchFreeFiniteEncoderEqualsTheCodec) {
  // Every 97th float bit pattern of both signs (about 2^23 values over the whole range) plus
  // every tie and its neighbours; an offline run compared all finite floats (0 mismatches).
  for (uint64_t i = 0; i < 0x7F800000u; i += 97) {
    for (const uint32_t sign : {0u, 0x80000000u}) {
      const float x = bits_to_float(static_cast<uint32_t>(i) | sign);
      ASSERT_EQ(float_to_e4m3_bits_finite_sat(x), float_to_e4m3_bits(x)) << std::hexfloat << x;
    }
  }
  for (int c = 0; c < 0x7E; ++c) {
    const double mid = (minifloat_value(static_cast<uint8_t>(c), 4, 3) +
                        minifloat_value(static_cast<uint8_t>(c + 1), 4, 3)) /
                       2;
    for (float x : {static_cast<float>(mid), std::nextafter(static_cast<float>(mid), 0.0f),
                    std::nextafter(static_cast<float>(mid), 1e9f)}) {
      EXPECT_EQ(float_to_e4m3_bits_finite_sat(x), float_to_e4m3_bits(x)) << x;
      EXPECT_EQ(float_to_e4m3_bits_finite_sat(-x), float_to_e4m3_bits(-x)) << -x;
    }
  }
  EXPECT_EQ(float_to_e4m3_bits_finite_sat(464.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3_bits_finite_sat(-3e38f), 0xFE);
}

TEST(E5M2, AllCodesDecodeAndRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const float v = e5m2_bits_to_float(code);
    if (is_e5m2_nonfinite(code)) {
      if ((code & 0x03) == 0) {
        EXPECT_TRUE(std::isinf(v)) << c;
        EXPECT_EQ(float_to_e5m2_bits(v, Overflow::kNonFinite), code);
        EXPECT_EQ(float_to_e5m2_bits(v, Overflow::kSaturate), (code & 0x80) | 0x7B);
      } else {
        EXPECT_TRUE(std::isnan(v)) << c;
        EXPECT_EQ(float_to_e5m2_bits(v) & 0x7F, 0x7F);
      }
      continue;
    }
    EXPECT_EQ(static_cast<double>(v), minifloat_value(code, 5, 2)) << "code " << c;
    EXPECT_EQ(float_to_e5m2_bits(v, Overflow::kSaturate), code) << "code " << c;
    EXPECT_EQ(float_to_e5m2_bits(v, Overflow::kNonFinite), code) << "code " << c;
  }
  EXPECT_EQ(e5m2_bits_to_float(0x7B), 57344.0f);
}

TEST(E5M2, EveryRoundingTieGoesToEvenAndOverflow) {
  check_all_ties(5, 2, 0x7B, [](float x) { return float_to_e5m2_bits(x); });
  EXPECT_EQ(float_to_e5m2_bits(61440.0f, Overflow::kNonFinite), 0x7C);  // tie to even = 2^16
  EXPECT_EQ(float_to_e5m2_bits(61440.0f, Overflow::kSaturate), 0x7B);
  EXPECT_EQ(float_to_e5m2_bits(std::nextafter(61440.0f, 0.0f), Overflow::kNonFinite), 0x7B);
  EXPECT_EQ(float_to_e5m2_bits(-1e30f, Overflow::kNonFinite), 0xFC);
}

TEST(BF16, AllCodesRoundTripAndTiesToEven) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    const float v = bf16_bits_to_float(code);
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(v))));
      continue;
    }
    ASSERT_EQ(float_to_bf16_bits(v), code) << c;
  }
  // 1 + 2^-8 is the tie between 1 and 1 + 2^-7: even is 1.
  EXPECT_EQ(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_EQ(float_to_bf16_bits(3.4e38f), 0x7F80);  // overflow to infinity
  EXPECT_EQ(float_to_bf16_bits(3.4e38f, Overflow::kSaturate), 0x7F7F);
}

TEST(UE8M0, PowerOfTwoScalesRoundUp) {
  EXPECT_EQ(ue8m0_to_float(float_to_ue8m0_ceil(1.0f)), 1.0f);
  EXPECT_EQ(ue8m0_to_float(float_to_ue8m0_ceil(1.0001f)), 2.0f);
  EXPECT_EQ(ue8m0_to_float(float_to_ue8m0_ceil(0.3f)), 0.5f);
  EXPECT_EQ(round_up_pow2(3.0f / 448.0f), 1.0f / 128.0f);
  for (float x : {1e-30f, 1e-3f, 0.7f, 5.0f, 1e30f}) {
    const float p = round_up_pow2(x);
    EXPECT_GE(p, x);
    EXPECT_LT(p, 2 * x);
  }
  EXPECT_TRUE(std::isnan(ue8m0_to_float(0xFF)));
  EXPECT_EQ(float_to_ue8m0_ceil(-1.0f), 0xFF);
}

}  // namespace
}  // namespace fp8moe
