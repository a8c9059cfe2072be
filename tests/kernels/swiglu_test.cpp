// The SwiGLU + 1x128 quantisation CPU references (src/kernels/swiglu_reference.cpp) against the
// formula of model/ops.h's swiglu_forward / swiglu_backward written out in float loops (the kernels
// tests do not link the model) and fp8moe::quantize over the whole matrix; and the argument checks
// of the GPU entry points, which throw before any launch (so they run without a GPU).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/swiglu.h"

namespace fp8moe {
namespace {

using kernels::ScaleLayout;

std::vector<bf16> random_gate_up(int64_t rows, int64_t ld, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-4.0f, 4.0f);
  std::vector<bf16> x(static_cast<size_t>(rows * ld));
  for (int64_t r = 0; r < rows; ++r) {
    const float mag = r % 7 == 3 ? 0.0f : std::exp2(log_mag(rng));  // some all-zero rows
    for (int64_t c = 0; c < ld; ++c) x[r * ld + c] = to_bf16(mag * (1 + c / 128 % 3) * normal(rng));
  }
  return x;
}

// model/ops.h's swiglu_forward, times the row weight.
float swiglu_formula(float g, float u, float w, bool weighted) {
  const float s = 1.0f / (1.0f + std::exp(-g));
  const float a = g * s * u;
  return weighted ? a * w : a;
}

struct Expected {
  std::vector<uint8_t> codes;
  std::vector<float> scales;
};

// fp8moe::quantize of h (zero in padding rows) over rows [r0, r0 + n), scales in `layout`.
Expected expect_block(const std::vector<float>& h, int64_t r0, int64_t n, int64_t inter, bool pow2,
                      ScaleLayout layout) {
  const QuantizedMatrix q =
      quantize(h.data() + r0 * inter, n, inter, inter, ScaleGranularity::k1x128, {pow2});
  return {q.codes, layout == ScaleLayout::kRowMajor ? q.scales : scales_mn_major(q)};
}

void expect_same_bytes(const void* got, const void* want, size_t bytes, const std::string& what) {
  EXPECT_EQ(std::memcmp(got, want, bytes), 0) << what;
}

TEST(SwigluReference, ForwardMatchesFormulaAndQuantize) {
  const int64_t rows = 37, inter = 256, ld = 2 * inter + 8, ld_codes = inter + 16;
  const std::vector<bf16> gu = random_gate_up(rows, ld, 1);
  std::vector<float> w(rows);
  for (int64_t r = 0; r < rows; ++r) w[r] = 0.01f * static_cast<float>(r + 1);
  std::vector<int32_t> layout_ids(rows);
  for (int64_t r = 0; r < rows; ++r) layout_ids[r] = r % 5 == 2 ? -1 : static_cast<int32_t>(r / 8);
  uint64_t n = 0;
  for (bool weighted : {false, true})
    for (bool padded : {false, true})
      for (bool pow2 : {false, true})
        for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
          const std::string what = "weighted=" + std::to_string(weighted) +
                                   " padded=" + std::to_string(padded) +
                                   " pow2=" + std::to_string(pow2) +
                                   " mn=" + std::to_string(layout == ScaleLayout::kMnMajor);
          std::vector<float> h(rows * inter, 0.0f);
          for (int64_t r = 0; r < rows; ++r)
            if (!padded || layout_ids[r] >= 0)
              for (int64_t j = 0; j < inter; ++j)
                h[r * inter + j] = swiglu_formula(to_float(gu[r * ld + j]),
                                                  to_float(gu[r * ld + inter + j]), w[r], weighted);
          const Expected want = expect_block(h, 0, rows, inter, pow2, layout);
          std::vector<uint8_t> codes(rows * ld_codes, 0xAB);
          std::vector<float> scales(want.scales.size(), -7.0f);
          kernels::swiglu_quantize_1x128_reference(
              gu.data(), ld, rows, inter, weighted ? w.data() : nullptr,
              padded ? layout_ids.data() : nullptr, nullptr, 0, pow2, codes.data(), ld_codes,
              scales.data(), layout);
          for (int64_t r = 0; r < rows; ++r)
            expect_same_bytes(codes.data() + r * ld_codes, want.codes.data() + r * inter, inter,
                              what + " codes row " + std::to_string(r));
          expect_same_bytes(scales.data(), want.scales.data(), 4 * scales.size(), what + " scales");
          EXPECT_EQ(codes[ld_codes - 1], 0xAB) << "columns past inter are not written";
          ++n;
        }
  EXPECT_EQ(n, 16u);
}

TEST(SwigluReference, MaskedFormGivesPerGroupScales) {
  const int64_t groups = 3, max_m = 10, inter = 384, rows = groups * max_m, ld = 2 * inter;
  const std::vector<bf16> gu = random_gate_up(rows, ld, 2);
  const std::vector<int32_t> masked_m = {0, 4, 10};
  std::vector<float> w(rows, 0.5f);
  for (bool pow2 : {false, true})
    for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
      std::vector<float> h(rows * inter, 0.0f);
      for (int64_t r = 0; r < rows; ++r)
        if (r % max_m < masked_m[r / max_m])
          for (int64_t j = 0; j < inter; ++j)
            h[r * inter + j] = swiglu_formula(to_float(gu[r * ld + j]),
                                              to_float(gu[r * ld + inter + j]), w[r], true);
      std::vector<uint8_t> want_codes;
      std::vector<float> want_scales;
      if (layout == ScaleLayout::kRowMajor) {
        const Expected e = expect_block(h, 0, rows, inter, pow2, layout);
        want_codes = e.codes;
        want_scales = e.scales;
      } else {
        for (int64_t g = 0; g < groups; ++g) {  // [groups][inter/128][padded_rows(max_m)]
          const Expected e = expect_block(h, g * max_m, max_m, inter, pow2, layout);
          want_codes.insert(want_codes.end(), e.codes.begin(), e.codes.end());
          want_scales.insert(want_scales.end(), e.scales.begin(), e.scales.end());
        }
        EXPECT_EQ(want_scales.size(), static_cast<size_t>(groups * 3 * padded_rows(max_m)));
      }
      std::vector<uint8_t> codes(rows * inter, 0xAB);
      std::vector<float> scales(want_scales.size(), -7.0f);
      kernels::swiglu_quantize_1x128_reference(gu.data(), ld, rows, inter, w.data(), nullptr,
                                               masked_m.data(), max_m, pow2, codes.data(), inter,
                                               scales.data(), layout);
      expect_same_bytes(codes.data(), want_codes.data(), codes.size(), "masked codes");
      expect_same_bytes(scales.data(), want_scales.data(), 4 * scales.size(), "masked scales");
    }
}

TEST(SwigluReference, BackwardMatchesFormula) {
  const int64_t rows = 29, inter = 128, ld = 2 * inter, ld_dh = inter + 8, ld_d = 2 * inter + 8;
  const std::vector<bf16> gu = random_gate_up(rows, ld, 3);
  const std::vector<bf16> dh = random_gate_up(rows, ld_dh, 4);
  std::vector<float> w(rows);
  for (int64_t r = 0; r < rows; ++r) w[r] = 0.03f * static_cast<float>(r + 1);
  std::vector<int32_t> layout_ids(rows);
  for (int64_t r = 0; r < rows; ++r) layout_ids[r] = r % 4 == 1 ? -1 : 0;
  for (bool weighted : {false, true})
    for (bool padded : {false, true}) {
      std::vector<bf16> d(rows * ld_d, bf16{0x7FC1});
      std::vector<float> drs(rows, -1.0f);
      kernels::swiglu_backward_reference(
          gu.data(), ld, dh.data(), ld_dh, rows, inter, weighted ? w.data() : nullptr,
          padded ? layout_ids.data() : nullptr, nullptr, 0, d.data(), ld_d, drs.data());
      for (int64_t r = 0; r < rows; ++r) {
        const bool real = !padded || layout_ids[r] >= 0;
        float sum = 0.0f, sum_abs = 0.0f;
        for (int64_t j = 0; j < inter; ++j) {
          const float g = to_float(gu[r * ld + j]), u = to_float(gu[r * ld + inter + j]);
          const float da = to_float(dh[r * ld_dh + j]) * (weighted ? w[r] : 1.0f);
          // model/ops.h's swiglu_backward
          const float s = 1.0f / (1.0f + std::exp(-g));
          const float dg = da * u * s * (1.0f + g * (1.0f - s)), du = da * (g * s);
          const float term = to_float(dh[r * ld_dh + j]) * (g * s) * u;
          sum += term;
          sum_abs += std::fabs(term);
          ASSERT_EQ(d[r * ld_d + j].bits, real ? to_bf16(dg).bits : 0) << r << "," << j;
          ASSERT_EQ(d[r * ld_d + inter + j].bits, real ? to_bf16(du).bits : 0) << r << "," << j;
        }
        EXPECT_EQ(d[r * ld_d + 2 * inter].bits, 0x7FC1) << "columns past 2 * inter untouched";
        if (real)
          EXPECT_NEAR(drs[r], sum, 1e-6f * sum_abs + 1e-30f) << r;
        else
          EXPECT_EQ(drs[r], 0.0f);
      }
    }
}

// Runs `call` and returns its Error's message ("" if it does not throw).
template <typename Fn>
std::string error_of(Fn&& call) {
  try {
    call();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument) << e.what();
    return e.what();
  }
  return "";
}

// The GPU entry points check their arguments on the host; they exist only in CUDA builds.
#if FP8MOE_HAVE_CUDA
TEST(SwigluArguments, BadInputsThrowBeforeAnyLaunch) {
  // Fake, aligned host addresses: every case below must throw before a kernel could touch them.
  const auto* gu = reinterpret_cast<const bf16*>(uintptr_t{0x10000});
  auto* codes = reinterpret_cast<uint8_t*>(uintptr_t{0x20000});
  auto* scales = reinterpret_cast<float*>(uintptr_t{0x30000});
  const int32_t* ids = reinterpret_cast<const int32_t*>(uintptr_t{0x40000});
  const auto fwd = [&](const bf16* x, int64_t ld, int64_t rows, int64_t inter,
                       kernels::SwigluRows which, uint8_t* c, int64_t ld_codes) {
    return error_of([&] {
      kernels::swiglu_quantize_1x128(x, ld, rows, inter, nullptr, which, false, c, ld_codes, scales,
                                     ScaleLayout::kMnMajor, nullptr);
    });
  };
  const kernels::SwigluRows plain{};
  EXPECT_NE(fwd(gu, 512, 4, 200, plain, codes, 256).find("multiple of 128"), std::string::npos);
  EXPECT_NE(fwd(gu, 500, 4, 256, plain, codes, 256).find("ld=500 < 2 * inter=512"),
            std::string::npos);
  EXPECT_NE(fwd(gu, 512, 4, 256, plain, codes, 128).find("ld_codes=128 < inter=256"),
            std::string::npos);
  EXPECT_NE(fwd(gu + 1, 512, 4, 256, plain, codes, 256).find("gate_up must be 16-byte aligned"),
            std::string::npos);
  EXPECT_NE(fwd(gu, 516, 4, 256, plain, codes, 256).find("ld % 8"), std::string::npos);
  EXPECT_NE(fwd(gu, 512, 4, 256, plain, codes + 8, 256).find("codes must be 16-byte aligned"),
            std::string::npos);
  EXPECT_NE(fwd(gu, 512, 4, 256, plain, codes, 264).find("ld_codes % 16"), std::string::npos);
  EXPECT_NE(fwd(gu, 512, 4, 256, {nullptr, ids, 0}, codes, 256).find("group_rows > 0"),
            std::string::npos);
  EXPECT_NE(fwd(gu, 512, 6, 256, {nullptr, ids, 4}, codes, 256).find("dividing rows"),
            std::string::npos);
  EXPECT_NE(
      fwd(gu, 512, 8, 256, {ids, ids, 4}, codes, 256).find("both grouped_layout and masked_m"),
      std::string::npos);
  EXPECT_NE(fwd(gu, 512, 8, 256, {nullptr, nullptr, 4}, codes, 256).find("without masked_m"),
            std::string::npos);
  // Backward.
  auto* d = reinterpret_cast<bf16*>(uintptr_t{0x50000});
  const auto bwd = [&](const bf16* dh, int64_t ld_dh, bf16* dgu, int64_t ld_d, int64_t inter) {
    return error_of([&] {
      kernels::swiglu_backward(gu, 2 * inter, dh, ld_dh, 4, inter, nullptr, plain, dgu, ld_d,
                               nullptr, nullptr);
    });
  };
  EXPECT_NE(bwd(d, 256, d, 512, 100).find("multiple of 128"), std::string::npos);
  EXPECT_NE(bwd(d, 128, d, 512, 256).find("ld_dh=128 < inter=256"), std::string::npos);
  EXPECT_NE(bwd(d, 256, d, 500, 256).find("ld_d=500 < 2 * inter=512"), std::string::npos);
  EXPECT_NE(bwd(d + 4, 256, d, 512, 256).find("dh must be 16-byte aligned"), std::string::npos);
  EXPECT_NE(bwd(d, 256, d + 4, 512, 256).find("d_gate_up must be 16-byte aligned"),
            std::string::npos);
  // The references check their shapes too.
  std::vector<bf16> x(2 * 256);
  std::vector<uint8_t> c(256);
  std::vector<float> s(4);
  EXPECT_NE(error_of([&] {
              kernels::swiglu_quantize_1x128_reference(x.data(), 512, 1, 256, nullptr, nullptr,
                                                       nullptr, 0, false, c.data(), 128, s.data(),
                                                       ScaleLayout::kRowMajor);
            }).find("ld_codes=128 < inter=256"),
            std::string::npos);
}
#endif  // FP8MOE_HAVE_CUDA

}  // namespace
}  // namespace fp8moe
