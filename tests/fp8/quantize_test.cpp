#include "fp8moe/fp8/quantize.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe {
namespace {

std::vector<float> random_values(int64_t n, uint64_t stream, float spread) {
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    x[i] = philox_normal(123, stream, i) *
           std::exp2(spread * (philox_uniform(123, stream + 1, i) - 0.5f));
  return x;
}

// Half the distance between E4M3 neighbours around |v| (v in code units, |v| <= 448).
double e4m3_half_spacing(double v) {
  v = std::fabs(v);
  if (v < std::ldexp(1.0, -6)) return std::ldexp(1.0, -10);
  return std::ldexp(1.0, static_cast<int>(std::floor(std::log2(v))) - 4);
}

void check_error_bound(const std::vector<float>& x, const QuantizedMatrix& q) {
  const Fp8MatrixRef r = q.ref();
  for (int64_t i = 0; i < q.rows; ++i)
    for (int64_t j = 0; j < q.cols; ++j) {
      const double s = r.scale(i, j);
      const double v = x[i * q.cols + j] / s;
      ASSERT_LE(std::fabs(v), 448.0 * (1 + 1e-6)) << "no element beyond the E4M3 range";
      const double err = std::fabs(r.value(i, j) - static_cast<double>(x[i * q.cols + j]));
      ASSERT_LE(err, e4m3_half_spacing(v) * s * (1 + 1e-6) + 1e-30)
          << "element (" << i << "," << j << ") x=" << x[i * q.cols + j] << " scale=" << s;
    }
}

// quantize() against its definition written as plain scalar loops (amax per tile, the scale
// formula, the reference encoder on x / scale), bit for bit: odd shapes that leave SIMD tails,
// magnitudes over 2^-30..2^30, and tiles holding 448 (scale exactly 1) next to E4M3 ties,
// subnormal ties, signed zeros and values just below the saturation threshold.
TEST(Quantize, SimdQuantisationEqualsTheScalarDefinition) {
  const float specials[] = {1.0625f, 1.1875f, -3.25f,     0.0f,       -0.0f,      464.0f,
                            -463.9f, 447.9f,  0x1.8p-10f, 0x1.4p-8f,  0x1p-7f,    0x1.ep-7f,
                            1e-30f,  -1e-38f, 0x1.1p-6f,  0x1.08p-6f, -0x1.8p-9f, 240.0f};
  const ScaleGranularity grans[] = {ScaleGranularity::k1x128, ScaleGranularity::k128x128,
                                    ScaleGranularity::kPerTensor};
  for (const auto& [rows, cols] :
       {std::pair<int64_t, int64_t>{3, 300}, {130, 77}, {1, 16}, {5, 129}, {2, 15}, {129, 256}}) {
    std::vector<float> x = random_values(rows * cols, 7 + rows, 60.0f);
    for (int64_t i = 0; i < rows * cols; ++i)
      if (philox_u32(9, rows, i) % 5 == 0) {
        // A special value scaled so that some tiles get scale 1 (their amax is 448).
        x[i] = specials[philox_u32(10, rows, i) % std::size(specials)];
        if (philox_u32(11, rows, i) % 3 == 0) x[i] = 448.0f;
      }
    for (const ScaleGranularity g : grans)
      for (const bool pow2 : {false, true}) {
        const QuantizedMatrix q = quantize(x.data(), rows, cols, cols, g, {.pow2_scales = pow2});
        const int64_t tr =
            g == ScaleGranularity::kPerTensor ? rows : (g == ScaleGranularity::k1x128 ? 1 : 128);
        const int64_t tc = g == ScaleGranularity::kPerTensor ? cols : 128;
        for (int64_t r0 = 0; r0 < rows; r0 += tr)
          for (int64_t c0 = 0; c0 < cols; c0 += tc) {
            float amax = 0.0f;
            for (int64_t r = r0; r < std::min(rows, r0 + tr); ++r)
              for (int64_t c = c0; c < std::min(cols, c0 + tc); ++c)
                amax = std::max(amax, std::fabs(x[r * cols + c]));
            const float scale = fp8_scale_for_amax(amax, pow2);
            ASSERT_EQ(std::bit_cast<uint32_t>(q.ref().scale(r0, c0)),
                      std::bit_cast<uint32_t>(scale))
                << granularity_name(g) << " tile at (" << r0 << "," << c0 << ")";
            for (int64_t r = r0; r < std::min(rows, r0 + tr); ++r)
              for (int64_t c = c0; c < std::min(cols, c0 + tc); ++c)
                ASSERT_EQ(q.codes[r * cols + c], float_to_e4m3_bits(x[r * cols + c] / scale))
                    << granularity_name(g) << " [" << rows << "," << cols << "] element (" << r
                    << "," << c << ") x=" << x[r * cols + c] << " scale=" << scale;
          }
      }
  }
}

TEST(Quantize, DequantizeIsValueOfEveryElementBitForBit) {
  // Every code (NaN codes included) under every granularity, with a padded leading dimension.
  for (const ScaleGranularity g :
       {ScaleGranularity::k1x128, ScaleGranularity::k128x128, ScaleGranularity::kPerTensor}) {
    const std::vector<float> x = random_values(130 * 300, 5, 30.0f);
    const QuantizedMatrix q = quantize(x.data(), 130, 300, 300, g);
    std::vector<uint8_t> codes(130 * 301);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i * 7);
    Fp8MatrixRef r = q.ref();
    r.codes = codes.data();
    r.ld = 301;
    const std::vector<float> d = dequantize(r);
    for (int64_t i = 0; i < 130; ++i)
      for (int64_t j = 0; j < 300; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(d[i * 300 + j]), std::bit_cast<uint32_t>(r.value(i, j)))
            << granularity_name(g) << " (" << i << "," << j << ")";
  }
}

TEST(Quantize, OneByOneTwentyEightErrorBoundPerElement) {
  for (int64_t cols : {128, 256, 200, 7, 1}) {  // partial last tiles included
    const int64_t rows = 5;
    const auto x = random_values(rows * cols, cols, 20.0f);
    const auto q = quantize(x.data(), rows, cols, cols, ScaleGranularity::k1x128);
    EXPECT_EQ(q.scale_cols_count(), (cols + 127) / 128);
    EXPECT_EQ(q.scale_rows_count(), rows);
    check_error_bound(x, q);
    // The largest element of each tile maps to +-448 exactly.
    for (int64_t r = 0; r < rows; ++r) {
      float amax = 0;
      for (int64_t c = 0; c < std::min<int64_t>(cols, 128); ++c)
        amax = std::max(amax, std::fabs(x[r * cols + c]));
      EXPECT_EQ(q.scales[r * q.scale_cols_count()], amax / 448.0f);
    }
  }
}

TEST(Quantize, BlockAndPerTensorErrorBound) {
  const int64_t rows = 300, cols = 260;
  const auto x = random_values(rows * cols, 77, 6.0f);
  const auto blocks = quantize(x.data(), rows, cols, cols, ScaleGranularity::k128x128);
  EXPECT_EQ(blocks.scale_rows_count(), 3);
  EXPECT_EQ(blocks.scale_cols_count(), 3);
  check_error_bound(x, blocks);
  const auto tensor = quantize(x.data(), rows, cols, cols, ScaleGranularity::kPerTensor);
  EXPECT_EQ(tensor.scales.size(), 1u);
  check_error_bound(x, tensor);
}

TEST(Quantize, PowerOfTwoScalesNeverOverflow) {
  const int64_t rows = 64, cols = 384;
  const auto x = random_values(rows * cols, 5, 30.0f);
  for (auto g : {ScaleGranularity::k1x128, ScaleGranularity::k128x128}) {
    const auto q = quantize(x.data(), rows, cols, cols, g, {.pow2_scales = true});
    for (float s : q.scales) {
      int e = 0;
      EXPECT_EQ(std::frexp(s, &e), 0.5f) << "scale " << s << " is a power of two";
    }
    for (uint8_t c : q.codes) EXPECT_NE(c & 0x7F, 0x7F) << "no NaN code";
    check_error_bound(x, q);
  }
}

TEST(Quantize, AllZeroTileGetsScaleOneAndZeroCodes) {
  std::vector<float> x(2 * 256, 0.0f);
  x[256 + 3] = 2.0f;  // second row, first tile non-zero
  const auto q = quantize(x.data(), 2, 256, 256, ScaleGranularity::k1x128);
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(q.scales[1], 1.0f);
  EXPECT_EQ(q.scales[2], 2.0f / 448.0f);
  EXPECT_EQ(q.scales[3], 1.0f);
  for (int c = 0; c < 256; ++c) EXPECT_EQ(q.codes[c], 0);
  EXPECT_EQ(dequantize(q)[256 + 3], 2.0f);
}

TEST(Quantize, NonFiniteInputIsAnErrorNamingItsPosition) {
  std::vector<float> x(4 * 130, 1.0f);
  x[2 * 130 + 129] = std::numeric_limits<float>::quiet_NaN();
  try {
    quantize(x.data(), 4, 130, 130, ScaleGranularity::k1x128);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
    EXPECT_NE(e.message().find("row 2, column 129"), std::string::npos) << e.message();
  }
}

TEST(Quantize, MnMajorScaleLayoutIsTransposedAndPadded) {
  const int64_t rows = 6, cols = 300;
  const auto x = random_values(rows * cols, 9, 4.0f);
  const auto q = quantize(x.data(), rows, cols, cols, ScaleGranularity::k1x128);
  const auto mn = scales_mn_major(q);
  EXPECT_EQ(padded_rows(rows), 8);
  ASSERT_EQ(mn.size(), 3u * 8u);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < 3; ++b) EXPECT_EQ(mn[b * 8 + r], q.scales[r * 3 + b]);
  EXPECT_EQ(mn[7], 0.0f);
  // The same values through a strided Fp8MatrixRef over the M-major layout.
  Fp8MatrixRef ref = q.ref();
  ref.scales = mn.data();
  ref.scale_row_stride = 1;
  ref.scale_col_stride = 8;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) EXPECT_EQ(ref.value(r, c), q.ref().value(r, c));
  const auto blocks = quantize(x.data(), rows, cols, cols, ScaleGranularity::k128x128);
  EXPECT_THROW(scales_mn_major(blocks), Error);
}

}  // namespace
}  // namespace fp8moe
