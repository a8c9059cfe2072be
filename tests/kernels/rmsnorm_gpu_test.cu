// The GPU RMSNorm (src/kernels/sm90_rmsnorm.cu) against its CPU references
// (src/kernels/rmsnorm_reference.cpp), which follow the kernels' FP32 order: y, rstd, codes,
// scales, dx and dw must be equal BIT FOR BIT. Fresh random inputs, outputs poisoned (0xFF),
// strided rows, short last dw chunks, accumulate on and off, dx aliasing dy; the fused form also
// against the GPU's own forward + quantize_1x128; NaN rows; bad shapes thrown before launch.
// Run: test_kernels_gpu --gtest_filter='RmsNormGpu*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/quantize.h"
#include "fp8moe/kernels/rmsnorm.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::ScaleLayout;
using test::DeviceBuffer;

std::vector<bf16> random_rows(int64_t rows, int64_t ld, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-8.0f, 8.0f);
  std::vector<bf16> x(static_cast<size_t>(rows * ld));
  for (int64_t r = 0; r < rows; ++r) {
    float mag = std::exp2(log_mag(rng));
    if (r % 17 == 3) mag = 0.0f;  // zero rows: rstd = 1 / sqrt(eps), zero tiles scale 1
    for (int64_t i = 0; i < ld; ++i)
      x[r * ld + i] = to_bf16(mag * static_cast<float>(1 + (i / 128) % 3) * normal(rng));
  }
  return x;
}

std::vector<float> random_weight(int64_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  std::vector<float> w(static_cast<size_t>(dim));
  for (float& v : w) v = u(rng);
  return w;
}

template <typename T>
int64_t count_bit_diffs(const std::vector<T>& got, const std::vector<T>& want, int64_t rows,
                        int64_t cols, int64_t ld) {
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r)
    bad += std::memcmp(got.data() + r * ld, want.data() + r * ld, cols * sizeof(T)) != 0;
  return bad;
}

double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Shape {
  int64_t rows, dim, pad;  // leading dimensions dim + pad
};

TEST(RmsNormGpu, ForwardBitExact) {
  const Shape shapes[] = {{1, 128, 0},   {37, 7168, 0}, {1000, 1536, 0}, {513, 512, 64},
                          {4, 16384, 0}, {3, 8, 8},     {33, 520, 0},    {0, 7168, 0}};
  for (const Shape& s : shapes) {
    const int64_t ld = s.dim + s.pad;
    const auto x = random_rows(s.rows, ld, 11 + s.dim + s.rows);
    const auto w = random_weight(s.dim, 12 + s.dim);
    std::vector<bf16> want_y(s.rows * ld, bf16{0xFFFF});
    std::vector<float> want_r(s.rows);
    kernels::rmsnorm_forward_reference(x.data(), ld, w.data(), s.rows, s.dim, 1e-6, want_y.data(),
                                       ld, want_r.data());
    DeviceBuffer<bf16> dx(x), dy(s.rows * ld);
    DeviceBuffer<float> dw(w), dr(s.rows);
    dy.poison();
    dr.poison();
    kernels::rmsnorm_forward(dx.get(), ld, dw.get(), s.rows, s.dim, 1e-6, dy.get(), ld, dr.get(),
                             nullptr);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    const auto got_y = dy.download();
    const auto got_r = dr.download();
    const int64_t bad = count_bit_diffs(got_y, want_y, s.rows, s.dim, ld);
    EXPECT_EQ(bad, 0) << s.rows << " x " << s.dim;
    EXPECT_EQ(count_bit_diffs(got_r, want_r, 1, s.rows, s.rows), 0) << s.rows << " x " << s.dim;
    std::printf("rmsnorm fwd %5lld x %5lld ld %5lld: %lld rows differ (bit), rstd %s\n",
                static_cast<long long>(s.rows), static_cast<long long>(s.dim),
                static_cast<long long>(ld), static_cast<long long>(bad),
                got_r == want_r ? "equal" : "DIFFER");
  }
}

TEST(RmsNormGpu, FusedQuantizeBitExact) {
  struct Case {
    int64_t rows, dim, pad;
    bool pow2, write_y;
    ScaleLayout layout;
  };
  const Case cases[] = {{37, 7168, 0, false, true, ScaleLayout::kMnMajor},
                        {37, 7168, 0, true, false, ScaleLayout::kRowMajor},
                        {1001, 1536, 128, false, true, ScaleLayout::kRowMajor},
                        {1001, 512, 0, true, true, ScaleLayout::kMnMajor},
                        {2, 128, 0, false, false, ScaleLayout::kMnMajor}};
  for (const Case& c : cases) {
    const int64_t ld = c.dim + c.pad, tiles = c.dim / 128;
    const int64_t ns =
        c.layout == ScaleLayout::kMnMajor ? tiles * padded_rows(c.rows) : tiles * c.rows;
    const auto x = random_rows(c.rows, ld, 21 + c.rows);
    const auto w = random_weight(c.dim, 22);
    std::vector<bf16> want_y(c.rows * ld, bf16{0xFFFF});
    std::vector<float> want_r(c.rows), want_s(ns, -1.0f);
    std::vector<uint8_t> want_c(c.rows * ld, 0xFF);
    kernels::rmsnorm_forward_quantize_1x128_reference(x.data(), ld, w.data(), c.rows, c.dim, 1e-6,
                                                      want_y.data(), ld, want_r.data(), c.pow2,
                                                      want_c.data(), ld, want_s.data(), c.layout);
    DeviceBuffer<bf16> dx(x), dy(c.rows * ld), dy2(c.rows * ld);
    DeviceBuffer<float> dw(w), dr(c.rows), ds(ns), ds2(ns);
    DeviceBuffer<uint8_t> dc(c.rows * ld), dc2(c.rows * ld);
    for (auto* b : {&dr, &ds, &ds2}) b->poison();
    dy.poison();
    dy2.poison();
    dc.poison();
    dc2.poison();
    kernels::rmsnorm_forward_quantize_1x128(dx.get(), ld, dw.get(), c.rows, c.dim, 1e-6,
                                            c.write_y ? dy.get() : nullptr, ld, dr.get(), c.pow2,
                                            dc.get(), ld, ds.get(), c.layout, nullptr);
    // The unfused GPU pipeline: forward, then quantize_1x128 of y.
    kernels::rmsnorm_forward(dx.get(), ld, dw.get(), c.rows, c.dim, 1e-6, dy2.get(), ld, nullptr,
                             nullptr);
    kernels::quantize_1x128(dy2.get(), c.rows, c.dim, ld, c.pow2, dc2.get(), ld, ds2.get(),
                            c.layout, nullptr);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    const auto got_c = dc.download(), got_c2 = dc2.download();
    const auto got_s = ds.download(), got_s2 = ds2.download();
    const int64_t bad_codes = count_bit_diffs(got_c, want_c, c.rows, c.dim, ld);
    EXPECT_EQ(bad_codes, 0) << c.rows << " x " << c.dim;
    EXPECT_EQ(count_bit_diffs(got_s, want_s, 1, ns, ns), 0) << c.rows << " x " << c.dim;
    EXPECT_EQ(count_bit_diffs(got_c2, want_c, c.rows, c.dim, ld), 0) << "unfused pipeline";
    EXPECT_EQ(count_bit_diffs(got_s2, want_s, 1, ns, ns), 0) << "unfused pipeline";
    EXPECT_EQ(count_bit_diffs(dr.download(), want_r, 1, c.rows, c.rows), 0);
    if (c.write_y)
      EXPECT_EQ(count_bit_diffs(dy.download(), want_y, c.rows, c.dim, ld), 0);
    else {  // y untouched (still poison)
      const auto y = dy.download();
      EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](bf16 v) { return v.bits == 0xFFFF; }));
    }
    std::printf("rmsnorm fused %5lld x %5lld %s%s: %lld code rows differ (bit), scales %s\n",
                static_cast<long long>(c.rows), static_cast<long long>(c.dim),
                c.layout == ScaleLayout::kMnMajor ? "mn-major" : "row-major", c.pow2 ? " pow2" : "",
                static_cast<long long>(bad_codes), got_s == want_s ? "equal" : "DIFFER");
  }
}

TEST(RmsNormGpu, BackwardBitExact) {
  const Shape shapes[] = {{1, 7168, 0},   {600, 7168, 0}, {1100, 1536, 64}, {5, 8, 0},
                          {2048, 512, 0}, {3, 16384, 0},  {0, 512, 0}};
  for (const Shape& s : shapes)
    for (const bool accumulate : {false, true}) {
      const int64_t ld = s.dim + s.pad;
      const auto x = random_rows(s.rows, ld, 31 + s.rows);
      const auto g = random_rows(s.rows, ld, 32 + s.dim);
      const auto w = random_weight(s.dim, 33);
      std::vector<float> rstd(s.rows), dw0(s.dim);
      for (int64_t i = 0; i < s.dim; ++i) dw0[i] = 0.01f * static_cast<float>(i % 13) - 0.05f;
      kernels::rmsnorm_forward_reference(x.data(), ld, w.data(), s.rows, s.dim, 1e-6, nullptr, ld,
                                         rstd.data());
      std::vector<bf16> want_dx(s.rows * ld, bf16{0xFFFF});
      std::vector<float> want_dw = dw0;
      kernels::rmsnorm_backward_reference(g.data(), ld, x.data(), ld, w.data(), rstd.data(), s.rows,
                                          s.dim, want_dx.data(), ld, want_dw.data(), accumulate);
      const kernels::RmsNormPlan plan = kernels::rmsnorm_plan(s.rows, s.dim);
      DeviceBuffer<bf16> dx(x), dg(g), ddx(s.rows * ld);
      DeviceBuffer<float> dw(w), dr(rstd), ddw(dw0), ws(plan.workspace_floats + 4);
      ddx.poison();
      ws.poison();
      if (!accumulate) ddw.poison();
      kernels::rmsnorm_backward(dg.get(), ld, dx.get(), ld, dw.get(), dr.get(), s.rows, s.dim,
                                ddx.get(), ld, ddw.get(), accumulate, ws.get(), nullptr);
      const auto got_dx = ddx.download();
      const auto got_dw = ddw.download();
      const int64_t bad = count_bit_diffs(got_dx, want_dx, s.rows, s.dim, ld);
      EXPECT_EQ(bad, 0) << s.rows << " x " << s.dim;
      EXPECT_EQ(count_bit_diffs(got_dw, want_dw, 1, s.dim, s.dim), 0) << s.rows << " x " << s.dim;
      // In place (dx = dy), and a second run: the same bits again.
      ws.poison();
      if (!accumulate)
        ddw.poison();
      else
        ddw.upload(dw0);
      kernels::rmsnorm_backward(dg.get(), ld, dx.get(), ld, dw.get(), dr.get(), s.rows, s.dim,
                                dg.get(), ld, ddw.get(), accumulate, ws.get(), nullptr);
      EXPECT_EQ(count_bit_diffs(dg.download(), want_dx, s.rows, s.dim, ld), 0) << "in place";
      EXPECT_EQ(ddw.download(), got_dw) << "second run";
      std::printf(
          "rmsnorm bwd %5lld x %5lld %s: chunks %lld x %lld rows, %lld dx rows differ "
          "(bit), dw %s (rel %.1e)\n",
          static_cast<long long>(s.rows), static_cast<long long>(s.dim),
          accumulate ? "acc " : "over", static_cast<long long>(plan.chunks),
          static_cast<long long>(plan.chunk_rows), static_cast<long long>(bad),
          got_dw == want_dw ? "equal" : "DIFFER", rel_err(got_dw, want_dw));
    }
}

TEST(RmsNormGpu, NonFiniteRows) {
  const int64_t rows = 9, dim = 1024;
  auto x = random_rows(rows, dim, 41);
  x[4 * dim + 100] = to_bf16(std::nanf(""));
  x[6 * dim + 7] = to_bf16(INFINITY);
  const auto w = random_weight(dim, 42);
  std::vector<bf16> want_y(rows * dim);
  std::vector<float> want_r(rows), want_s(rows * dim / 128);
  std::vector<uint8_t> want_c(rows * dim);
  kernels::rmsnorm_forward_reference(x.data(), dim, w.data(), rows, dim, 1e-6, want_y.data(), dim,
                                     want_r.data());
  DeviceBuffer<bf16> dx(x), dy(rows * dim);
  DeviceBuffer<float> dw(w), dr(rows), ds(rows * dim / 128);
  DeviceBuffer<uint8_t> dc(rows * dim);
  DeviceBuffer<kernels::NonFiniteReport> rep(1);
  kernels::reset_nonfinite(rep.get(), nullptr);
  kernels::rmsnorm_forward_quantize_1x128(dx.get(), dim, dw.get(), rows, dim, 1e-6, dy.get(), dim,
                                          dr.get(), false, dc.get(), dim, ds.get(),
                                          ScaleLayout::kRowMajor, nullptr, rep.get());
  const auto y = dy.download();
  const auto r = dr.download();
  for (int64_t row = 0; row < rows; ++row) {
    const bool bad_row = row == 4 || row == 6;
    EXPECT_EQ(std::isnan(r[row]) || r[row] == 0.0f, bad_row) << "rstd row " << row << " " << r[row];
    if (!bad_row)
      EXPECT_EQ(std::memcmp(y.data() + row * dim, want_y.data() + row * dim, dim * 2), 0) << row;
  }
  try {
    kernels::check_nonfinite(rep.get(), "rmsnorm", nullptr);
    ADD_FAILURE() << "no error for NaN / inf inputs";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 4, column 100"), std::string::npos) << e.what();
  }
}

TEST(RmsNormGpu, BadShapesThrowBeforeLaunch) {
  DeviceBuffer<bf16> x(64 * 256), y(64 * 256);
  DeviceBuffer<float> w(256), r(64), s(64 * 2), ws(64 * 256);
  DeviceBuffer<uint8_t> c(64 * 256);
  EXPECT_THROW(
      kernels::rmsnorm_forward(x.get(), 100, w.get(), 2, 100, 1e-6, y.get(), 100, r.get(), nullptr),
      Error);  // dim % 8
  EXPECT_THROW(
      kernels::rmsnorm_forward(x.get(), 130, w.get(), 2, 128, 1e-6, y.get(), 128, r.get(), nullptr),
      Error);  // ld % 8
  EXPECT_THROW(kernels::rmsnorm_forward(x.get() + 1, 128, w.get(), 2, 128, 1e-6, y.get(), 128,
                                        r.get(), nullptr),
               Error);  // misaligned
  EXPECT_THROW(
      kernels::rmsnorm_forward(x.get(), 128, w.get(), 2, 128, -1.0, y.get(), 128, r.get(), nullptr),
      Error);  // eps
  EXPECT_THROW(kernels::rmsnorm_forward_quantize_1x128(x.get(), 136, w.get(), 2, 136, 1e-6, y.get(),
                                                       136, r.get(), false, c.get(), 136, s.get(),
                                                       ScaleLayout::kRowMajor, nullptr),
               Error);  // dim % 128
  EXPECT_THROW(kernels::rmsnorm_backward(x.get(), 256, x.get(), 256, w.get(), r.get(), 2, 256,
                                         y.get(), 256, w.get(), false, nullptr, nullptr),
               Error);  // no workspace
  FM_CHECK_CUDA(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace fp8moe
