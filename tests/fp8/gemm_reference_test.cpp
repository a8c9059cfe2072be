#include "fp8moe/fp8/gemm_reference.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <tuple>

#include "fp8moe/core/philox.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe {
namespace {

QuantizedMatrix random_quantized(int64_t rows, int64_t cols, ScaleGranularity g, uint64_t stream,
                                 bool positive = false) {
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = positive ? philox_uniform(11, stream, i) : philox_normal(11, stream, i);
  return quantize(x.data(), rows, cols, cols, g);
}

std::vector<double> exact(const Fp8MatrixRef& a, const Fp8MatrixRef& b) {
  std::vector<double> d(static_cast<size_t>(a.rows * b.rows));
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t n = 0; n < b.rows; ++n) {
      double s = 0;
      for (int64_t k = 0; k < a.cols; ++k)
        s += static_cast<double>(e4m3_bits_to_float(a.codes[m * a.ld + k])) * a.scale(m, k) *
             static_cast<double>(e4m3_bits_to_float(b.codes[n * b.ld + k])) * b.scale(n, k);
      d[m * b.rows + n] = s;
    }
  return d;
}

double rel_l2(const std::vector<float>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

TEST(GemmReference, RoundingHelperTruncatesAndRoundsToEven) {
  EXPECT_EQ(round_to_mantissa_bits(1.0 + 0.75 * std::ldexp(1.0, -3), 3, AccumRounding::kTruncate),
            1.0 + std::ldexp(1.0, -3) * 0);
  EXPECT_EQ(round_to_mantissa_bits(1.0 + std::ldexp(1.0, -4), 3, AccumRounding::kNearestEven),
            1.0);  // tie -> even
  EXPECT_EQ(round_to_mantissa_bits(1.0 + 3 * std::ldexp(1.0, -4), 3, AccumRounding::kNearestEven),
            1.25);  // tie -> even (0b010)
  EXPECT_EQ(round_to_mantissa_bits(-1.9, 1, AccumRounding::kTruncate), -1.5);
  EXPECT_EQ(round_to_mantissa_bits(0.3, 52, AccumRounding::kTruncate), 0.3);
}

TEST(GemmReference, TensorCoreStepAlignsToTheLargestExponentAndTruncates) {
  const auto step = [](double acc, std::initializer_list<double> p) {
    return accumulate_step(acc, std::data(p), static_cast<int>(p.size()), 14,
                           AccumRounding::kTruncate);
  };
  const double q = std::ldexp(1.0, -14);            // the quantum next to 1.0 with 14 fraction bits
  EXPECT_EQ(step(1.0, {0.75 * q}), 1.0);            // shifted out entirely
  EXPECT_EQ(step(1.0, {1.5 * q}), 1.0 + q);         // low half-bit dropped
  EXPECT_EQ(step(1.0, {-1.5 * q}), 1.0 - q);        // toward zero for negative addends too
  EXPECT_EQ(step(2.0 - q, {2 * q}), 2.0);           // carry: one more bit dropped
  EXPECT_EQ(step(1.0, {0.75 * q, 0.75 * q}), 1.0);  // each addend truncated before the sum
  EXPECT_EQ(step(0.0, {3.0, -3.0}), 0.0);
  EXPECT_EQ(step(0.5 * q, {1.0}), 1.0);  // the accumulator itself is shifted out
  // The simpler model chops the exact sum instead.
  const double p[] = {0.75 * q, 0.75 * q};
  EXPECT_EQ(accumulate_step(1.0, p, 2, 14, AccumRounding::kTruncateSum), 1.0 + q);
}

TEST(GemmReference, MixedSignErrorsCancelUnderTheTensorCoreModel) {
  // Same inputs, two truncation models: aligning addends loses bits of both signs, chopping the
  // running sum always pulls toward zero, so its error is far larger for zero-mean inputs.
  const auto a = random_quantized(8, 4096, ScaleGranularity::k1x128, 21);
  const auto b = random_quantized(8, 4096, ScaleGranularity::k128x128, 22);
  const auto ref = exact(a.ref(), b.ref());
  std::vector<float> aligned(64), chopped(64);
  gemm_fp8_reference(a.ref(), b.ref(), aligned.data(), 8, {14, AccumRounding::kTruncate, 0, 1});
  gemm_fp8_reference(a.ref(), b.ref(), chopped.data(), 8, {14, AccumRounding::kTruncateSum, 0, 1});
  EXPECT_LT(10 * rel_l2(aligned, ref), rel_l2(chopped, ref));
}

TEST(GemmReference, PromotedFp32MatchesExactProduct) {
  for (int64_t k : {128, 512, 1000, 96}) {
    const auto a = random_quantized(17, k, ScaleGranularity::k1x128, 1);
    const auto b = random_quantized(23, k, ScaleGranularity::k128x128, 2);
    std::vector<float> d(17 * 23, NAN);
    gemm_fp8_reference(a.ref(), b.ref(), d.data(), 23, {}, false, 2);
    EXPECT_LT(rel_l2(d, exact(a.ref(), b.ref())), 1e-6) << "K=" << k;
  }
}

// The fast model exactly as the header documents it, written plainly: per output and window,
// 8 lanes (k mod 8) in k order, the pairwise lane reduction, then one FMA with both scales.
std::vector<float> documented_fast_model(const Fp8MatrixRef& a, const Fp8MatrixRef& b,
                                         int64_t interval, const std::vector<float>& c0) {
  std::vector<float> d = c0;
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t n = 0; n < b.rows; ++n) {
      float acc = d[m * b.rows + n];
      for (int64_t w0 = 0; w0 < a.cols; w0 += interval) {
        float lane[8] = {};
        for (int64_t k = w0; k < std::min(a.cols, w0 + interval); ++k) {
          const float prod =
              e4m3_bits_to_float(a.codes[m * a.ld + k]) * e4m3_bits_to_float(b.codes[n * b.ld + k]);
          lane[(k - w0) % 8] += prod;
        }
        const float partial = ((lane[0] + lane[4]) + (lane[2] + lane[6])) +
                              ((lane[1] + lane[5]) + (lane[3] + lane[7]));
        acc = std::fma(partial, a.scale(m, w0) * b.scale(n, w0), acc);
      }
      d[m * b.rows + n] = acc;
    }
  return d;
}

TEST(GemmReference, BlockedFastPathIsBitIdenticalToTheDocumentedOrder) {
  // Ragged M and N (edges of the 2x4 blocks and 64-row panels), a window that is a multiple of
  // 8 but shorter than 128, and one that is not a multiple of 8.
  for (const auto& [m, n, k] :
       {std::tuple{7, 70, 200}, std::tuple{1, 3, 100}, std::tuple{4, 8, 256}}) {
    const auto a = random_quantized(m, k, ScaleGranularity::k1x128, 31);
    const auto b = random_quantized(n, k, ScaleGranularity::k128x128, 32);
    for (const bool accumulate : {false, true}) {
      std::vector<float> c0(static_cast<size_t>(m * n), 0.0f);
      if (accumulate)
        for (size_t i = 0; i < c0.size(); ++i) c0[i] = philox_normal(3, 3, i);
      const auto want = documented_fast_model(a.ref(), b.ref(), 128, c0);
      for (const int threads : {1, 2}) {
        std::vector<float> got = c0;
        gemm_fp8_reference(a.ref(), b.ref(), got.data(), n, {}, accumulate, threads);
        for (size_t i = 0; i < got.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
              << "M=" << m << " N=" << n << " K=" << k << " element " << i;
      }
    }
  }
}

// Restores the SIMD choice a test changed.
struct SimdGuard {
  FastSimd saved = gemm_fp8_reference_simd();
  ~SimdGuard() { set_gemm_fp8_reference_simd(saved); }
};

std::vector<FastSimd> runnable_simd() {
  std::vector<FastSimd> out{FastSimd::kGeneric};
  SimdGuard guard;
  if (set_gemm_fp8_reference_simd(FastSimd::kAvx2)) out.push_back(FastSimd::kAvx2);
  return out;
}

TEST(GemmReference, EverySimdPathIsBitIdenticalToAPlainScalarLoopOnRandomShapes) {
  // Random odd shapes (M, N off the 2x4 blocks and the panels), K a multiple of 128 and not,
  // every scale granularity, tiles of very different magnitude (and all-zero ones), padded
  // leading dimensions, promotion windows of 128, 64, 32, 12, 8 and 4 and one over all of K.
  SimdGuard guard;
  const ScaleGranularity grans[] = {ScaleGranularity::k1x128, ScaleGranularity::k128x128,
                                    ScaleGranularity::kPerTensor};
  int cases = 0;
  for (uint64_t trial = 0; trial < 32; ++trial) {
    const int64_t m = 1 + philox_u32(41, trial, 0) % 37;
    const int64_t n = 1 + philox_u32(41, trial, 1) % 150;
    int64_t k = trial % 3 == 2 ? 8 + philox_u32(41, trial, 2) % 250
                               : 128 * (1 + philox_u32(41, trial, 2) % 4);
    const ScaleGranularity ga = grans[trial % 3], gb = grans[(trial / 3) % 3];
    // 4 and 12: windows that are not a multiple of 8 (the unpacked path).
    const int64_t intervals[] = {128, 64, 32, 8, 0, 4, 12};
    int64_t interval = intervals[philox_u32(41, trial, 3) % 7];
    if (trial % 6 == 5) {  // one window over all of a K that is not a multiple of 8
      k = 8 * (1 + philox_u32(41, trial, 2) % 15) + 1 + philox_u32(41, trial, 4) % 7;
      interval = 0;
    }
    // Operands with per-row magnitudes from 2^-20 to 2^20 and some all-zero rows.
    const auto make = [&](int64_t rows, ScaleGranularity g, uint64_t stream, int64_t ld) {
      std::vector<float> x(static_cast<size_t>(rows * k));
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t pick = philox_u32(42, stream, r);
        const float mag = pick % 7 == 0 ? 0.0f : std::ldexp(1.0f, static_cast<int>(pick % 41) - 20);
        for (int64_t c = 0; c < k; ++c)
          x[r * k + c] = mag * philox_normal(43, stream, static_cast<uint64_t>(r * k + c));
      }
      QuantizedMatrix q = quantize(x.data(), rows, k, k, g, {.pow2_scales = stream % 2 == 1});
      std::vector<uint8_t> codes(static_cast<size_t>(rows * ld), 0xFF);  // padding: NaN codes
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(q.codes.data() + r * k, k, codes.data() + r * ld);
      q.codes = std::move(codes);
      return q;
    };
    const int64_t lda = k + trial % 2 * 5, ldb = k + trial % 4 / 2 * 3;
    const QuantizedMatrix qa = make(m, ga, 2 * trial, lda), qb = make(n, gb, 2 * trial + 1, ldb);
    Fp8MatrixRef a = qa.ref(), b = qb.ref();
    a.ld = lda;
    b.ld = ldb;
    const AccumulatorModel model{23, AccumRounding::kNearestEven, static_cast<int>(interval), 1};
    const int64_t window = interval > 0 ? interval : k;
    const bool inside = (a.tile_cols() >= k || a.tile_cols() % window == 0) &&
                        (b.tile_cols() >= k || b.tile_cols() % window == 0);
    if (!inside) continue;  // the emulated path: not the fast model
    const bool accumulate = trial % 4 == 1;
    std::vector<float> c0(static_cast<size_t>(m * n), 0.0f);
    if (accumulate)
      for (size_t i = 0; i < c0.size(); ++i) c0[i] = philox_normal(44, trial, i);
    const auto want = documented_fast_model(a, b, window, c0);
    for (const FastSimd simd : runnable_simd()) {
      ASSERT_TRUE(set_gemm_fp8_reference_simd(simd));
      for (const int threads : {1, 3}) {
        std::vector<float> got = c0;
        gemm_fp8_reference(a, b, got.data(), n, model, accumulate, threads);
        for (size_t i = 0; i < got.size(); ++i)
          ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
              << fast_simd_name(simd) << " M=" << m << " N=" << n << " K=" << k
              << " interval=" << interval << " A " << granularity_name(ga) << " B "
              << granularity_name(gb) << " threads=" << threads << " element " << i;
      }
    }
    ++cases;
  }
  EXPECT_GE(cases, 12);  // most draws must reach the fast model
}

TEST(GemmReference, FastPathAgreesWithSequentialEmulation) {
  const auto a = random_quantized(8, 384, ScaleGranularity::k1x128, 3);
  const auto b = random_quantized(8, 384, ScaleGranularity::k128x128, 4);
  std::vector<float> fast(64), slow(64);
  gemm_fp8_reference(a.ref(), b.ref(), fast.data(), 8, {});
  // 24 bits with nearest rounding takes the sequential emulated path: same math, other order.
  gemm_fp8_reference(a.ref(), b.ref(), slow.data(), 8, {24, AccumRounding::kNearestEven, 128});
  for (int i = 0; i < 64; ++i) EXPECT_NEAR(fast[i], slow[i], 1e-5 * (1 + std::fabs(slow[i])));
}

TEST(GemmReference, LimitedAccumulationErrorGrowsWithKAndPromotionFixesIt) {
  double previous = 0;
  for (int64_t k : {1024, 4096}) {
    const auto a = random_quantized(16, k, ScaleGranularity::k1x128, 5, true);
    const auto b = random_quantized(16, k, ScaleGranularity::k128x128, 6, true);
    const auto ref = exact(a.ref(), b.ref());
    std::vector<float> lim(256), pro(256);
    gemm_fp8_reference(a.ref(), b.ref(), lim.data(), 16, AccumulatorModel::hopper_tensor_core(0));
    gemm_fp8_reference(a.ref(), b.ref(), pro.data(), 16, AccumulatorModel::hopper_tensor_core(128));
    const double e_lim = rel_l2(lim, ref), e_pro = rel_l2(pro, ref);
    EXPECT_GT(e_lim, 10 * e_pro) << "K=" << k;
    EXPECT_GT(e_lim, previous * 1.5) << "K=" << k;
    previous = e_lim;
    // Truncation only ever loses magnitude when every product is positive.
    for (int i = 0; i < 256; ++i) EXPECT_LE(lim[i], ref[i]);
  }
}

TEST(GemmReference, WeightGradientFormAccumulatesIntoC) {
  // dW[N,K] += dY^T X: both operands 1x128 along the token axis (here K = 256 tokens).
  const auto dy_t = random_quantized(12, 256, ScaleGranularity::k1x128, 7);
  const auto x_t = random_quantized(20, 256, ScaleGranularity::k1x128, 8);
  std::vector<float> c(12 * 20);
  for (size_t i = 0; i < c.size(); ++i) c[i] = philox_normal(5, 5, i);
  const std::vector<float> c0 = c;
  gemm_fp8_reference(dy_t.ref(), x_t.ref(), c.data(), 20, {}, /*accumulate=*/true);
  const auto prod = exact(dy_t.ref(), x_t.ref());
  for (size_t i = 0; i < c.size(); ++i)
    EXPECT_NEAR(c[i], c0[i] + prod[i], 1e-4 * (1 + std::fabs(prod[i])));
}

TEST(GemmReference, Bf16OutputIsTheRoundedFp32Output) {
  const auto a = random_quantized(5, 256, ScaleGranularity::k1x128, 9);
  const auto b = random_quantized(7, 256, ScaleGranularity::k128x128, 10);
  std::vector<float> f(35);
  std::vector<bf16> h(35);
  gemm_fp8_reference(a.ref(), b.ref(), f.data(), 7);
  gemm_fp8_reference_bf16(a.ref(), b.ref(), h.data(), 7);
  for (int i = 0; i < 35; ++i) EXPECT_EQ(h[i].bits, float_to_bf16_bits(f[i]));
}

TEST(GemmReference, BadOperandsAreRejectedWithTheShapes) {
  const auto a = random_quantized(4, 256, ScaleGranularity::k1x128, 1);
  const auto b = random_quantized(4, 384, ScaleGranularity::k128x128, 2);
  std::vector<float> d(16);
  try {
    gemm_fp8_reference(a.ref(), b.ref(), d.data(), 4);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("[4,256]"), std::string::npos) << e.message();
  }
  const auto b2 = random_quantized(4, 256, ScaleGranularity::k128x128, 2);
  EXPECT_THROW(
      gemm_fp8_reference(a.ref(), b2.ref(), d.data(), 4, {0, AccumRounding::kTruncate, 128}),
      Error);
  EXPECT_THROW(
      gemm_fp8_reference(a.ref(), b2.ref(), d.data(), 4, {23, AccumRounding::kTruncate, -1}),
      Error);
  EXPECT_THROW(
      gemm_fp8_reference(a.ref(), b2.ref(), d.data(), 4, {14, AccumRounding::kTruncate, 128, 0}),
      Error);
  EXPECT_THROW(gemm_fp8_reference(a.ref(), b2.ref(), d.data(), 2), Error);  // ldd < N
}

}  // namespace
}  // namespace fp8moe
