// requantize_1x128_transpose_reference (kernels/requantize.h) on the CPU: its output dequantises
// to the input's transpose within E4M3's rounding, padding rows (NaN codes and scales) give zero
// codes, row-major and M-major input scales give the same bits, pow2 scales are powers of two,
// bad shapes throw. Run: build/tests/test_kernels --gtest_filter='Requant*'
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/requantize.h"

namespace fp8moe::kernels {
namespace {

struct Input {
  QuantizedMatrix q;
  std::vector<float> mn;
  std::vector<int32_t> layout;
};

Input make_input(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> mag(-8.0f, 8.0f);
  std::vector<float> x(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float m = r % 17 == 3 ? 0.0f : std::exp2(mag(rng));
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = m * normal(rng);
  }
  Input in;
  in.q = quantize(x.data(), rows, cols, cols, ScaleGranularity::k1x128);
  in.layout.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    in.layout[r] = r % 128 < 100 ? static_cast<int32_t>(r / 256) : -1;
    if (in.layout[r] >= 0) continue;
    std::fill_n(in.q.codes.begin() + r * cols, cols, uint8_t{0x7F});  // E4M3 NaN
    std::fill_n(in.q.scales.begin() + r * (cols / 128), cols / 128, std::nanf(""));
  }
  in.mn = scales_mn_major(in.q);
  return in;
}

TEST(RequantizeReference, TransposeWithinE4m3RoundingPaddingZero) {
  for (bool pow2 : {false, true}) {
    const int64_t rows = 512, cols = 384;
    const Input in = make_input(rows, cols, 7 + pow2);
    std::vector<uint8_t> t(cols * rows), t2(cols * rows);
    std::vector<float> ts((rows / 128) * cols), ts2((rows / 128) * cols);
    requantize_1x128_transpose_reference(in.q.codes.data(), cols, in.q.scales.data(),
                                         ScaleLayout::kRowMajor, rows, cols, in.layout.data(), pow2,
                                         t.data(), ts.data());
    requantize_1x128_transpose_reference(in.q.codes.data(), cols, in.mn.data(),
                                         ScaleLayout::kMnMajor, rows, cols, in.layout.data(), pow2,
                                         t2.data(), ts2.data());
    EXPECT_EQ(t, t2);
    EXPECT_EQ(ts, ts2);
    int64_t bad = 0;
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < rows; ++r) {
        const float s = ts[(r / 128) * cols + c];
        if (pow2) {
          EXPECT_EQ(s, round_up_pow2(s));
        }
        const float got = e4m3_bits_to_float(t[c * rows + r]) * s;
        if (in.layout[r] < 0) {
          bad += t[c * rows + r] != 0;
          continue;
        }
        const float want = in.q.ref().value(r, c);
        // Half an E4M3 ulp: 2^-4 relative for normals, 2^-10 * scale for subnormals.
        bad += !(std::fabs(got - want) <= std::fabs(want) * 0.0625f + s * 0.001953125f);
      }
    EXPECT_EQ(bad, 0) << "pow2=" << pow2;
  }
}

TEST(RequantizeReference, NoLayoutIsIdentityOnAlreadyColumnScaledData) {
  // Without a layout every row is real; requantising twice returns the first result.
  const int64_t rows = 256, cols = 256;
  Input in = make_input(rows, cols, 11);
  in.q = quantize(std::vector<float>(rows * cols, 1.5f).data(), rows, cols, cols,
                  ScaleGranularity::k1x128);
  std::vector<uint8_t> t(cols * rows);
  std::vector<float> ts((rows / 128) * cols);
  requantize_1x128_transpose_reference(in.q.codes.data(), cols, in.q.scales.data(),
                                       ScaleLayout::kRowMajor, rows, cols, nullptr, false, t.data(),
                                       ts.data());
  for (int64_t i = 0; i < rows * cols; ++i) ASSERT_EQ(e4m3_bits_to_float(t[i]) * ts[0], 1.5f);
}

TEST(RequantizeReference, BadShapesThrow) {
  std::vector<uint8_t> c(256 * 256);
  std::vector<float> s(1024);
  EXPECT_THROW(requantize_1x128_transpose_reference(c.data(), 256, s.data(), ScaleLayout::kRowMajor,
                                                    100, 256, nullptr, false, c.data(), s.data()),
               Error);
  EXPECT_THROW(requantize_1x128_transpose_reference(c.data(), 256, s.data(), ScaleLayout::kRowMajor,
                                                    128, 200, nullptr, false, c.data(), s.data()),
               Error);
  EXPECT_THROW(requantize_1x128_transpose_reference(c.data(), 100, s.data(), ScaleLayout::kRowMajor,
                                                    128, 128, nullptr, false, c.data(), s.data()),
               Error);
}

}  // namespace
}  // namespace fp8moe::kernels
