// The GPU RMSNorm's CPU references (src/kernels/rmsnorm_reference.cpp) against model/ops.h's
// double-precision rmsnorm (the model's meaning; written out here as model_rmsnorm_*, since the
// kernels module sits below the model module): the FP32 fixed-order sums differ from double
// sums by a few FP32 ulps, so y and dx are within one BF16 ulp (+ a tiny absolute slack), rstd
// within 1e-6 relative, dw within 1e-5 of sum |terms|. Also the plan, the fused form's layouts
// and the shape checks. Run: test_kernels --gtest_filter='RmsNorm*'
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/rmsnorm.h"

namespace fp8moe {
namespace {

std::vector<bf16> random_rows(int64_t rows, int64_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-8.0f, 8.0f);
  std::vector<bf16> x(static_cast<size_t>(rows * dim));
  for (int64_t r = 0; r < rows; ++r) {
    const float mag = std::exp2(log_mag(rng));
    for (int64_t i = 0; i < dim; ++i) x[r * dim + i] = to_bf16(mag * normal(rng));
  }
  return x;
}

std::vector<float> random_weight(int64_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  std::vector<float> w(static_cast<size_t>(dim));
  for (float& v : w) v = u(rng);
  return w;
}

// model/ops.cpp's rmsnorm_forward / rmsnorm_backward, the same double-precision loops.
void model_rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t dim, double eps,
                           float* y, float* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float rs = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    rstd[r] = rs;
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = xr[i] * rs * w[i];
  }
}
void model_rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy,
                            int64_t rows, int64_t dim, float* dx, float* dw) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    const double rs = rstd[r];
    double dot = 0;
    for (int64_t i = 0; i < dim; ++i) dot += static_cast<double>(dyr[i]) * w[i] * xr[i];
    const double coef = dot * rs * rs * rs / dim;
    for (int64_t i = 0; i < dim; ++i) {
      dx[r * dim + i] = static_cast<float>(rs * dyr[i] * w[i] - coef * xr[i]);
      dw[i] += static_cast<float>(dyr[i] * xr[i] * rs);
    }
  }
}

// Within one BF16 ulp of the double-precision value (rounded once or twice).
void expect_bf16_close(float got, double want, const char* what, int64_t at) {
  const double ulp = std::ldexp(1.0, std::ilogb(std::max(std::fabs(want), 1e-30)) - 7);
  EXPECT_LE(std::fabs(got - want), ulp + 1e-30)
      << what << " at " << at << ": " << got << " vs " << want;
}

TEST(RmsNorm, PlanIsAFunctionOfTheShape) {
  const kernels::RmsNormPlan p = kernels::rmsnorm_plan(32768, 7168);
  EXPECT_EQ(p.threads, 224);  // 896 vectors, 4 a thread
  EXPECT_EQ(p.chunk_rows, 64);
  EXPECT_EQ(p.chunks, 512);
  EXPECT_EQ(p.workspace_floats, 512 * 7168);
  const kernels::RmsNormPlan q = kernels::rmsnorm_plan(1100, 8);
  EXPECT_EQ(q.threads, 32);
  EXPECT_EQ(q.chunk_rows, 3);
  EXPECT_EQ(q.chunks, 367);
  EXPECT_EQ(kernels::rmsnorm_plan(0, 512).chunks, 0);
}

TEST(RmsNorm, ForwardReferenceMatchesModelOps) {
  for (const int64_t dim : {int64_t{8}, int64_t{520}, int64_t{7168}}) {
    const int64_t rows = 9;
    const std::vector<bf16> x = random_rows(rows, dim, 1 + dim);
    const std::vector<float> w = random_weight(dim, 2 + dim);
    std::vector<bf16> y(rows * dim);
    std::vector<float> rstd(rows), xf(rows * dim), yf(rows * dim), rstd_want(rows);
    kernels::rmsnorm_forward_reference(x.data(), dim, w.data(), rows, dim, 1e-6, y.data(), dim,
                                       rstd.data());
    for (size_t i = 0; i < x.size(); ++i) xf[i] = to_float(x[i]);
    model_rmsnorm_forward(xf.data(), w.data(), rows, dim, 1e-6, yf.data(), rstd_want.data());
    for (int64_t r = 0; r < rows; ++r)
      EXPECT_NEAR(rstd[r], rstd_want[r], 1e-6 * rstd_want[r]) << "dim " << dim << " row " << r;
    for (int64_t i = 0; i < rows * dim; ++i) expect_bf16_close(to_float(y[i]), yf[i], "y", i);
  }
}

TEST(RmsNorm, BackwardReferenceMatchesModelOps) {
  for (const int64_t dim : {int64_t{8}, int64_t{1536}}) {
    const int64_t rows = 1100;  // 3 rows a chunk, the last chunk short
    const std::vector<bf16> x = random_rows(rows, dim, 3 + dim), dy = random_rows(rows, dim, 4);
    const std::vector<float> w = random_weight(dim, 5);
    std::vector<float> rstd(rows), xf(rows * dim), dyf(rows * dim), dxf(rows * dim);
    kernels::rmsnorm_forward_reference(x.data(), dim, w.data(), rows, dim, 1e-6, nullptr, dim,
                                       rstd.data());
    std::vector<bf16> dx(rows * dim);
    std::vector<float> dw(dim, 0.25f), dw_want(dim, 0.0f), dw_abs(dim, 0.0f);
    kernels::rmsnorm_backward_reference(dy.data(), dim, x.data(), dim, w.data(), rstd.data(), rows,
                                        dim, dx.data(), dim, dw.data(), true);
    for (size_t i = 0; i < x.size(); ++i) xf[i] = to_float(x[i]), dyf[i] = to_float(dy[i]);
    model_rmsnorm_backward(xf.data(), w.data(), rstd.data(), dyf.data(), rows, dim, dxf.data(),
                           dw_want.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < dim; ++i)
        dw_abs[i] += std::fabs(dyf[r * dim + i] * xf[r * dim + i] * rstd[r]);
    // dx = rs*dy*w - coef*x: cancellation makes the FP32 dot's error show relative to the
    // terms, so the bound is one BF16 ulp of the result plus 1e-5 of |coef * x| + |rs*dy*w|.
    for (int64_t r = 0; r < rows; ++r) {
      double dot = 0;
      for (int64_t i = 0; i < dim; ++i)
        dot += static_cast<double>(dyf[r * dim + i]) * w[i] * xf[r * dim + i];
      const double coef = dot * rstd[r] * rstd[r] * rstd[r] / dim;
      for (int64_t i = 0; i < dim; ++i) {
        const int64_t k = r * dim + i;
        const double want = dxf[k];
        const double ulp = std::ldexp(1.0, std::ilogb(std::max(std::fabs(want), 1e-30)) - 7);
        const double slack = 1e-5 * (std::fabs(coef * xf[k]) + std::fabs(rstd[r] * dyf[k] * w[i]));
        ASSERT_LE(std::fabs(to_float(dx[k]) - want), ulp + slack) << "dx at " << k;
      }
    }
    for (int64_t i = 0; i < dim; ++i)
      EXPECT_NEAR(dw[i], 0.25f + dw_want[i], 1e-5 * dw_abs[i] + 1e-6) << "dw at " << i;
  }
}

TEST(RmsNorm, FusedReferenceIsForwardThenQuantize) {
  const int64_t rows = 7, dim = 384;
  const std::vector<bf16> x = random_rows(rows, dim, 6);
  const std::vector<float> w = random_weight(dim, 7);
  std::vector<bf16> y(rows * dim);
  std::vector<float> rstd(rows);
  kernels::rmsnorm_forward_reference(x.data(), dim, w.data(), rows, dim, 1e-6, y.data(), dim,
                                     rstd.data());
  std::vector<float> yf(rows * dim);
  for (size_t i = 0; i < y.size(); ++i) yf[i] = to_float(y[i]);
  for (const bool pow2 : {false, true}) {
    const QuantizedMatrix q = quantize(yf.data(), rows, dim, dim, ScaleGranularity::k1x128, {pow2});
    const std::vector<float> mn = scales_mn_major(q);
    for (const auto layout : {kernels::ScaleLayout::kRowMajor, kernels::ScaleLayout::kMnMajor}) {
      const bool row_major = layout == kernels::ScaleLayout::kRowMajor;
      std::vector<uint8_t> codes(rows * dim, 0xAB);
      std::vector<float> scales(row_major ? q.scales.size() : mn.size(), -1.0f);
      kernels::rmsnorm_forward_quantize_1x128_reference(x.data(), dim, w.data(), rows, dim, 1e-6,
                                                        nullptr, dim, nullptr, pow2, codes.data(),
                                                        dim, scales.data(), layout);
      EXPECT_EQ(codes, q.codes);
      EXPECT_EQ(scales, row_major ? q.scales : mn);
    }
  }
}

TEST(RmsNorm, BadShapesAreRejected) {
  std::vector<bf16> x(16 * 136);
  std::vector<float> w(136), rstd(16);
  std::vector<uint8_t> codes(16 * 136);
  EXPECT_THROW(kernels::rmsnorm_forward_reference(x.data(), 12, w.data(), 1, 12, 1e-6, x.data(), 12,
                                                  rstd.data()),
               Error);  // dim not a multiple of 8
  EXPECT_THROW(kernels::rmsnorm_forward_reference(x.data(), 0, w.data(), 1, 0, 1e-6, x.data(), 0,
                                                  rstd.data()),
               Error);
  EXPECT_THROW(kernels::check_rmsnorm_shape("t", 1, 16392, false), Error);
  EXPECT_THROW(kernels::check_rmsnorm_shape("t", -1, 128, false), Error);
  EXPECT_NO_THROW(kernels::check_rmsnorm_shape("t", 1, 16384, true));
  EXPECT_THROW(kernels::rmsnorm_forward_quantize_1x128_reference(
                   x.data(), 136, w.data(), 1, 136, 1e-6, nullptr, 136, nullptr, false,
                   codes.data(), 136, rstd.data(), kernels::ScaleLayout::kRowMajor),
               Error);  // 136 is no multiple of 128
}

}  // namespace
}  // namespace fp8moe
