// exact_quotient (fp8/exact_quotient.h) against the IEEE quotient x / s, bit for bit: every finite
// BF16 x against a few thousand scales (FLT_MIN, the largest scale, powers of two and their
// neighbours, random exponents, amax / 448 of random amax), tens of millions of random FP32 x with
// |x| <= 448 s, subnormal x, +-0, +-448 s, the block maximum itself; and exact_quotient_any on
// +-inf, NaN and s = inf. Run: `build/tests/test_fp8 --gtest_filter='ExactQuotient*'`.
#include "fp8moe/fp8/exact_quotient.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fp8moe/fp8/codec.h"

namespace fp8moe {
namespace {

// NOTE: x / s below must be one IEEE single division (SSE, no x87 excess precision), and nothing
// may be contracted into an FMA (exact_quotient.h has no a * b + c expression: q0 is rounded
// before it enters std::fma).
static_assert(FLT_EVAL_METHOD == 0, "float arithmetic must round to float (no x87)");

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Bitwise equal, or both NaN (the host keeps a NaN's sign and payload where the GPU gives the
// canonical NaN: the GPU kernels' NaN bits come from the GPU's own multiply either way).
bool same(float a, float b) {
  return bits(a) == bits(b) || (std::isnan(a) && std::isnan(b));
}

constexpr float kMaxScale = FLT_MAX / 448.0f;

// The scale fp8_scale_for_amax gives (non-pow2): max(RN(amax / 448), FLT_MIN).
float scale_of(float amax) {
  return std::fmax(amax / 448.0f, FLT_MIN);
}

// A few thousand scales in [FLT_MIN, FLT_MAX / 448].
std::vector<float> test_scales() {
  std::vector<float> s = {FLT_MIN,       std::nextafter(FLT_MIN, 1.0f),
                          kMaxScale,     std::nextafter(kMaxScale, 0.0f),
                          1.0f / 448.0f, 1.0f,
                          3.0f};
  for (int e = -126; e <= 119; ++e) {  // powers of two, 2, 1 ulp under and over
    const float p = std::ldexp(1.0f, e);
    s.push_back(p);
    s.push_back(std::nextafter(p, 0.0f));
    s.push_back(std::nextafter(std::nextafter(p, 0.0f), 0.0f));
    s.push_back(std::nextafter(p, FLT_MAX));
    s.push_back(std::nextafter(std::nextafter(p, FLT_MAX), FLT_MAX));
  }
  std::mt19937_64 rng(20261127);
  for (int i = 0; i < 1200; ++i) {  // random exponent across the range, random mantissa
    const uint32_t e = 1 + static_cast<uint32_t>(rng() % 246);  // biased exponent 1..246
    s.push_back(from_bits((e << 23) | static_cast<uint32_t>(rng() & 0x7FFFFFu)));
  }
  for (int i = 0; i < 1200; ++i) {  // amax / 448 of random amax (FP32 and BF16 amax)
    const uint32_t u = static_cast<uint32_t>(rng() % 0x7F800000u);  // any finite positive float
    s.push_back(scale_of(from_bits(u)));
    s.push_back(scale_of(from_bits(u & 0xFFFF0000u)));
  }
  for (float& v : s) v = std::fmin(std::fmax(v, FLT_MIN), kMaxScale);
  return s;
}

// |x| within the quantiser's domain for scale s (the block's amax may sit a rounding above 448 s).
bool in_domain(float x, float s) {
  return static_cast<double>(std::fabs(x)) <= 448.0 * static_cast<double>(s) * (1.0 + 0x1p-22);
}

// Every case: the E4M3 code equals the quotient's, and q keeps x / s's sign. Bit for bit when
// |x / s| >= 2^-100; below, |q| < 2^-99 (exact_quotient.h's contract). The largest |x / s| whose q
// differs in any bit is kept to show how far below 2^-100 the differences stay.
struct Tally {
  int64_t checked = 0, wrong = 0, tiny_differ = 0;
  float first_x = 0.0f, first_s = 0.0f, largest_differ = 0.0f;
  void add(float got, float want, float x, float s) {
    ++checked;
    bool ok = same(got, want);
    if (!ok && !std::isnan(want)) {
      const float aw = std::fabs(want);
      ok = aw < 0x1p-100f && std::fabs(got) < 0x1p-99f && std::signbit(got) == std::signbit(want) &&
           float_to_e4m3_bits(got) == float_to_e4m3_bits(want);
      if (ok) {
        ++tiny_differ;
        largest_differ = std::fmax(largest_differ, aw);
      }
    }
    if (!ok && wrong++ == 0) {
      first_x = x;
      first_s = s;
    }
  }
  void print(const char* what) const {
    std::printf(
        "%s: %lld cases, %lld wrong; %lld tiny quotients differ in bits (largest |x/s| %a)\n", what,
        static_cast<long long>(checked), static_cast<long long>(wrong),
        static_cast<long long>(tiny_differ), static_cast<double>(largest_differ));
  }
};

void check(Tally& t, float x, float s) {
  const Divisor d = make_divisor(s);
  const float want = x / s;
  t.add(exact_quotient(x, d), want, x, s);
  t.add(exact_quotient_any(x, d), want, x, s);
}

#define EXPECT_NONE_WRONG(t)                                                     \
  EXPECT_EQ((t).wrong, 0) << (t).wrong << " of " << (t).checked                  \
                          << " differ; first x=" << std::hexfloat << (t).first_x \
                          << " s=" << (t).first_s

TEST(ExactQuotient, EveryBf16AgainstThousandsOfScales) {
  const std::vector<float> scales = test_scales();
  ASSERT_GT(scales.size(), 3000u);
  Tally t;
  int64_t outside = 0, outside_wrong = 0;
  for (const float s : scales) {
    const Divisor d = make_divisor(s);
    for (uint32_t b = 0; b < 0x10000u; ++b) {
      const float x = from_bits(b << 16);
      if (!std::isfinite(x)) continue;
      const float want = x / s;
      const float got = exact_quotient(x, d);
      if (in_domain(x, s)) {
        t.add(got, want, x, s);
        t.add(exact_quotient_any(x, d), want, x, s);
      } else {
        ++outside;  // larger quotients than a quantiser forms: counted, not required
        outside_wrong += !same(got, want);
      }
    }
  }
  EXPECT_NONE_WRONG(t);
  EXPECT_GT(t.checked, int64_t{200'000'000});
  t.print("every BF16 x");
  std::printf("outside |x| <= 448 s (not required): %lld of %lld quotients differ\n",
              static_cast<long long>(outside_wrong), static_cast<long long>(outside));
}

TEST(ExactQuotient, RandomFp32WithinTheBlockRange) {
  const std::vector<float> scales = test_scales();
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  Tally t;
  for (int64_t i = 0; i < 24'000'000; ++i) {
    const float s = scales[rng() % scales.size()];
    const float lim = std::nextafter(448.0f * s, 0.0f) <= kMaxScale * 448.0f ? 448.0f * s : FLT_MAX;
    float x;
    if (i % 2 == 0) {
      x = unit(rng) * lim;  // uniform in [-448 s, 448 s]
    } else {                // random bits, scaled down into the range: quotients of every exponent
      x = from_bits(static_cast<uint32_t>(rng()) & 0xFF7FFFFFu);  // finite, either sign
      while (!in_domain(x, s))
        x = from_bits(bits(x) - (static_cast<uint32_t>(rng() % 40 + 1) << 23));
    }
    check(t, x, s);
  }
  EXPECT_NONE_WRONG(t);
  t.print("random FP32 x");
}

TEST(ExactQuotient, SubnormalsZerosAndTheBlockMaximum) {
  const std::vector<float> scales = test_scales();
  std::mt19937_64 rng(11);
  Tally t;
  for (const float s : scales) {
    for (int i = 0; i < 1500; ++i) {  // subnormal x, either sign
      const uint32_t m = 1 + static_cast<uint32_t>(rng() % 0x7FFFFFu);
      check(t, from_bits(m), s);
      check(t, from_bits(m | 0x80000000u), s);
    }
    for (uint32_t m = 1; m < 64; ++m) check(t, from_bits(m), s);  // the smallest subnormals
    check(t, 0.0f, s);
    check(t, -0.0f, s);
    const float edge = 448.0f * s;  // +-448 s, rounded, and its neighbours inside the domain
    for (const float x : {edge, std::nextafter(edge, 0.0f), std::nextafter(edge, FLT_MAX)}) {
      if (!in_domain(x, s)) continue;
      check(t, x, s);
      check(t, -x, s);
    }
  }
  for (int i = 0; i < 2'000'000; ++i) {  // the block maximum: x = +-amax, s = scale_of(amax)
    const float amax = from_bits(static_cast<uint32_t>(rng() % 0x7F800000u) | 1u);
    const float s = scale_of(amax);
    check(t, amax, s);
    check(t, -amax, s);
    const float amax16 = from_bits(bits(amax) & 0xFFFF0000u);
    if (amax16 > 0.0f) check(t, amax16, scale_of(amax16));
  }
  EXPECT_NONE_WRONG(t);
  t.print("subnormal, zero, +-448 s, block maximum");
  // x = -0 keeps its sign (the E4M3 code 0x80, not 0x00).
  EXPECT_EQ(bits(exact_quotient(-0.0f, make_divisor(3.0f))), 0x80000000u);
  EXPECT_EQ(float_to_e4m3_bits(exact_quotient(-0.0f, make_divisor(FLT_MIN))), 0x80u);
}

// The kernels' power-of-two branch multiplies by d.p: exactly 1 / s for s = 2^k.
TEST(ExactQuotient, PowerOfTwoScalesMultiplyByP) {
  for (int k = -126; k <= 119; ++k) {
    const float s = std::ldexp(1.0f, k);
    EXPECT_EQ(bits(make_divisor(s).p), bits(1.0f / s)) << "s = 2^" << k;
  }
}

// The quantisers' own scale, amax / 448, for any amax (not only |amax| <= 448 * 448).
TEST(ExactQuotient, AmaxOver448) {
  const Divisor c = e4m3_max_divisor(), d = make_divisor(kE4M3Max);
  EXPECT_EQ(bits(c.p), bits(d.p));
  EXPECT_EQ(bits(c.s_p), bits(d.s_p));
  EXPECT_EQ(bits(c.inv_s_p), bits(d.inv_s_p));
  std::mt19937_64 rng(3);
  Tally t;
  auto check448 = [&t, &c](float amax) {
    t.add(exact_quotient_any(amax, c), amax / kE4M3Max, amax, kE4M3Max);
    t.add(std::fmax(exact_quotient_any(amax, c), FLT_MIN), scale_of(amax), amax, kE4M3Max);
  };
  for (uint32_t b = 0; b < 0x7F81u; ++b) check448(from_bits(b << 16));    // every BF16 amax, inf
  for (uint32_t u = 0; u < 0x7F800000u; u += 61) check448(from_bits(u));  // every 61st float
  for (int i = 0; i < 4'000'000; ++i)
    check448(from_bits(static_cast<uint32_t>(rng() % 0x7F800000u)));
  EXPECT_NONE_WRONG(t);
  t.print("amax / 448");
}

TEST(ExactQuotient, AnyCoversInfinitiesNansAndAnInfiniteScale) {
  const std::vector<float> scales = test_scales();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Tally t;
  auto check_any = [&t](float x, float s) {
    t.add(exact_quotient_any(x, make_divisor(s)), x / s, x, s);
  };
  for (const float s : scales)
    for (const float x : {inf, -inf, nan, -nan}) check_any(x, s);
  for (uint32_t b = 0; b < 0x10000u; ++b)
    check_any(from_bits(b << 16), inf);  // incl. +-0, inf, NaN
  for (uint32_t u = 1; u < 0x800000u; u += 97) check_any(from_bits(u), inf);
  EXPECT_NONE_WRONG(t);
}

}  // namespace
}  // namespace fp8moe
