// The fused SwiGLU + 1x128 quantisation and its backward (src/kernels/sm90_swiglu.cu) against the
// CPU references (src/kernels/swiglu_reference.cpp): fresh random inputs, outputs poisoned (0xFF),
// gate_up's padding rows NaN (never read). CUDA's expf and glibc's expf may differ by an ulp or
// two, so codes are not bit-exact: the bounds (docs/kernels/swiglu.md) are
//   forward:  scales within 2^-20 relative (pow2: equal or a factor 2); a differing code differs
//             by at most one E4M3 step of its tile; differing codes < 1e-4 of the elements (+1);
//             ||deq(got) - deq(want)|| / ||deq(want)|| <= 2e-3; padding rows and M-major padding
//             entries exact;
//   backward: every BF16 within one BF16 ulp of the reference, < 1e-3 of them differing,
//             ||got - want|| / ||want|| <= 1e-4; d_row_scale within 1e-5 * sum_j |term_j|.
// Run: test_kernels_gpu --gtest_filter='SwigluGpu*'
#include <cuda_fp8.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/swiglu.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::ScaleLayout;
using test::DeviceBuffer;

// ---- every finite float through the conversion the forward kernel uses ----
__global__ void e4m3_mismatch_kernel(unsigned long long* mismatches, unsigned* first) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  unsigned long long bad = 0;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < (uint64_t{1} << 32); i += 2 * stride) {
    const uint32_t b0 = static_cast<uint32_t>(i), b1 = static_cast<uint32_t>(i + stride);
    const float x0 = __uint_as_float(b0), x1 = __uint_as_float(b1);
    // The same intrinsic as sm90_swiglu.cu's e4m3x2.
    const uint32_t hw = __nv_cvt_float2_to_fp8x2(make_float2(x0, x1), __NV_SATFINITE, __NV_E4M3);
    const bool ok0 = !isfinite(x0) || (hw & 0xFF) == float_to_e4m3_bits(x0);
    const bool ok1 =
        i + stride >= (uint64_t{1} << 32) || !isfinite(x1) || (hw >> 8) == float_to_e4m3_bits(x1);
    if (!ok0) atomicMin(first, b0);
    if (!ok1) atomicMin(first, b1);
    bad += !ok0 + !ok1;
  }
  if (bad) atomicAdd(mismatches, bad);
}

TEST(SwigluGpu, HardwareE4m3MatchesCodec) {
  DeviceBuffer<unsigned long long> bad(1);
  DeviceBuffer<unsigned> first(1);
  bad.poison(0);
  first.poison(0xFF);
  e4m3_mismatch_kernel<<<1024, 256>>>(bad.get(), first.get());
  FM_CHECK_LAUNCH();
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(bad.download()[0], 0u)
      << "first mismatching float bits 0x" << std::hex << first.download()[0];
}

// ---- inputs ----
std::vector<bf16> random_bf16(int64_t rows, int64_t ld, uint64_t seed, float gate_mag) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-6.0f, 6.0f);
  std::vector<bf16> x(static_cast<size_t>(rows * ld));
  for (int64_t r = 0; r < rows; ++r) {
    float mag = std::exp2(log_mag(rng));
    if (r % 23 == 5) mag = 0.0f;  // all-zero rows: scale 1
    for (int64_t c = 0; c < ld; ++c)
      x[r * ld + c] =
          to_bf16(mag * gate_mag * static_cast<float>(1 + (c / 128 + r) % 5) * normal(rng));
  }
  return x;
}

struct Form {
  const char* name;
  bool contiguous_padding;  // grouped_layout with -1 rows
  int64_t groups;           // masked form: groups of max_m rows (0: not masked)
};

struct Rows {
  std::vector<int32_t> layout, masked_m;
  int64_t group_rows = 0;
  bool real(int64_t r) const {
    if (!layout.empty()) return layout[r] >= 0;
    if (!masked_m.empty()) return r % group_rows < masked_m[r / group_rows];
    return true;
  }
};

Rows make_rows(int64_t rows, const Form& f) {
  Rows w;
  if (f.contiguous_padding) {
    w.layout.resize(rows);
    for (int64_t r = 0; r < rows; ++r)
      w.layout[r] = (r % 7 == 3 || (rows > 4 && r >= rows - rows / 10)) ? -1 : r / 64;
  }
  if (f.groups > 0) {
    w.group_rows = rows / f.groups;
    const int32_t m[4] = {0, 1, 50, 96};
    for (int64_t g = 0; g < f.groups; ++g) w.masked_m.push_back(m[g % 4]);
  }
  return w;
}

// Padding rows of gate_up become NaN: the kernels must never read them.
void poison_padding(std::vector<bf16>& gu, int64_t rows, int64_t ld, const Rows& which) {
  for (int64_t r = 0; r < rows; ++r)
    if (!which.real(r))
      for (int64_t c = 0; c < ld; ++c) gu[r * ld + c] = bf16{0xFFFF};
}

int64_t scale_count(int64_t rows, int64_t inter, ScaleLayout layout, const Rows& which) {
  const int64_t tiles = inter / 128;
  if (layout == ScaleLayout::kRowMajor) return rows * tiles;
  if (which.group_rows > 0) return rows / which.group_rows * tiles * padded_rows(which.group_rows);
  return tiles * padded_rows(rows);
}

// ---- forward ----
struct ForwardCase {
  int64_t rows, inter;
  Form form;
  bool weighted, pow2;
  ScaleLayout layout;
  bool strided;  // ld > 2 * inter and ld_codes > inter
};

void check_forward(const ForwardCase& fc, uint64_t seed) {
  const int64_t rows = fc.rows, inter = fc.inter, tiles = inter / 128;
  const int64_t ld = 2 * inter + (fc.strided ? 64 : 0), ld_codes = inter + (fc.strided ? 32 : 0);
  const Rows which = make_rows(rows, fc.form);
  std::vector<bf16> gu = random_bf16(rows, ld, seed, 1.0f);
  poison_padding(gu, rows, ld, which);
  std::vector<float> w(rows);
  std::mt19937_64 rng(seed + 7);
  std::uniform_real_distribution<float> wd(0.0f, 2.0f);
  for (float& x : w) x = wd(rng);
  const int32_t* layout_h = which.layout.empty() ? nullptr : which.layout.data();
  const int32_t* masked_h = which.masked_m.empty() ? nullptr : which.masked_m.data();
  const int64_t ns = scale_count(rows, inter, fc.layout, which);
  std::vector<uint8_t> want_codes(rows * ld_codes, 0xFF);
  std::vector<float> want_scales(ns);
  kernels::swiglu_quantize_1x128_reference(
      gu.data(), ld, rows, inter, fc.weighted ? w.data() : nullptr, layout_h, masked_h,
      which.group_rows, fc.pow2, want_codes.data(), ld_codes, want_scales.data(), fc.layout);

  DeviceBuffer<bf16> d_gu(gu);
  DeviceBuffer<float> d_w(w);
  DeviceBuffer<int32_t> d_layout(which.layout), d_masked(which.masked_m);
  DeviceBuffer<uint8_t> codes(rows * ld_codes);
  DeviceBuffer<float> scales(ns);
  codes.poison();
  scales.poison();
  const kernels::SwigluRows rows_arg{layout_h ? d_layout.get() : nullptr,
                                     masked_h ? d_masked.get() : nullptr, which.group_rows};
  kernels::swiglu_quantize_1x128(d_gu.get(), ld, rows, inter, fc.weighted ? d_w.get() : nullptr,
                                 rows_arg, fc.pow2, codes.get(), ld_codes, scales.get(), fc.layout,
                                 nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<uint8_t> got_codes = codes.download();
  const std::vector<float> got_scales = scales.download();

  // Scale of (row, tile) in either layout.
  const int64_t per_group = which.group_rows > 0 ? which.group_rows : rows;
  const int64_t padded = fc.layout == ScaleLayout::kMnMajor ? padded_rows(per_group) : per_group;
  const auto sidx = [&](int64_t r, int64_t t) {
    if (fc.layout == ScaleLayout::kRowMajor) return r * tiles + t;
    return (r / per_group * tiles + t) * padded + r % per_group;
  };
  // Padding entries of M-major scales: exactly 0.
  int64_t bad_pad = 0;
  for (int64_t i = 0; i < ns; ++i)
    if (fc.layout == ScaleLayout::kMnMajor && i % padded >= per_group && got_scales[i] != 0.0f)
      ++bad_pad;
  EXPECT_EQ(bad_pad, 0) << "M-major padding scale entries not 0";

  double err2 = 0.0, ref2 = 0.0;
  int64_t diff_codes = 0, far_codes = 0, bad_scales = 0, bad_padding_rows = 0, n = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < tiles; ++t) {
      const float sg = got_scales[sidx(r, t)], sw = want_scales[sidx(r, t)];
      if (!which.real(r)) {
        bool ok = sg == 1.0f;
        for (int64_t j = t * 128; j < t * 128 + 128; ++j) ok &= got_codes[r * ld_codes + j] == 0;
        bad_padding_rows += !ok;
        continue;
      }
      const bool scale_ok = fc.pow2 ? (sg == sw || sg == 2 * sw || 2 * sg == sw)
                                    : std::fabs(sg - sw) <= std::ldexp(std::fabs(sw), -20);
      bad_scales += !scale_ok;
      for (int64_t j = t * 128; j < t * 128 + 128; ++j) {
        const uint8_t cg = got_codes[r * ld_codes + j], cw = want_codes[r * ld_codes + j];
        const double a = static_cast<double>(e4m3_bits_to_float(cg)) * sg;
        const double b = static_cast<double>(e4m3_bits_to_float(cw)) * sw;
        err2 += (a - b) * (a - b);
        ref2 += b * b;
        ++n;
        if (cg == cw) continue;
        ++diff_codes;
        // One E4M3 step: 2^-3 of the larger magnitude, or a subnormal step of the larger scale.
        const double step = std::max(std::ldexp(std::max(std::fabs(a), std::fabs(b)), -3),
                                     std::ldexp(static_cast<double>(std::max(sg, sw)), -9));
        if (std::fabs(a - b) > step * (1 + 1e-6)) ++far_codes;
      }
    }
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  std::printf(
      "  swiglu fwd %5lld x %5lld %-10s w=%d pow2=%d %s: rel %.3e, codes differing %lld / "
      "%lld (%.2e)\n",
      static_cast<long long>(rows), static_cast<long long>(inter), fc.form.name, fc.weighted,
      fc.pow2, fc.layout == ScaleLayout::kMnMajor ? "mn " : "row", rel,
      static_cast<long long>(diff_codes), static_cast<long long>(n),
      n ? static_cast<double>(diff_codes) / static_cast<double>(n) : 0.0);
  EXPECT_EQ(bad_padding_rows, 0) << "padding rows: codes 0 and scale 1";
  EXPECT_EQ(bad_scales, 0) << "scales off by more than the exp difference explains";
  EXPECT_EQ(far_codes, 0) << "codes off by more than one E4M3 step";
  EXPECT_LE(diff_codes, n / 10000 + 1) << "too many differing codes";
  EXPECT_LE(rel, 2e-3);
  // Columns past inter in strided codes are not written.
  if (fc.strided) {
    int64_t touched = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = inter; j < ld_codes; ++j) touched += got_codes[r * ld_codes + j] != 0xFF;
    EXPECT_EQ(touched, 0);
  }
}

const Form kPlain{"plain", false, 0};
const Form kPadded{"padded", true, 0};
const Form kMasked{"masked4x96", false, 4};

TEST(SwigluGpu, ForwardMatchesReference) {
  uint64_t seed = 1;
  int64_t k = 0;
  for (int64_t rows : {1, 5, 130, 4096 + 17})
    for (int64_t inter : {128, 2048, 7168}) {
      const bool big = rows * inter > (int64_t{1} << 20);
      for (const Form& form : {kPlain, kPadded})
        for (bool weighted : {false, true})
          for (bool pow2 : {false, true})
            for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
              // Big shapes: every option once (2 combinations per form), not every product.
              ++k;
              if (big && (weighted == pow2 || (layout == ScaleLayout::kMnMajor) != weighted))
                continue;
              const ForwardCase fc{rows, inter, form, weighted, pow2, layout, !big && k % 3 == 0};
              SCOPED_TRACE(testing::Message() << rows << "x" << inter << " " << form.name
                                              << " w=" << weighted << " pow2=" << pow2);
              check_forward(fc, seed++);
            }
    }
}

TEST(SwigluGpu, ForwardMaskedMatchesReference) {
  uint64_t seed = 500;
  for (int64_t inter : {128, 2048, 7168})
    for (bool weighted : {false, true})
      for (bool pow2 : {false, true})
        for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
          SCOPED_TRACE(testing::Message()
                       << "masked 4x96 x " << inter << " w=" << weighted << " pow2=" << pow2);
          check_forward({4 * 96, inter, kMasked, weighted, pow2, layout, false}, seed++);
        }
}

// ---- backward ----
bool within_one_bf16_ulp(bf16 got, bf16 want) {
  if (got.bits == want.bits) return true;
  const float g = to_float(got), w = to_float(want);
  if (!std::isfinite(g) || !std::isfinite(w)) return false;
  const float ulp = std::max(std::ldexp(std::fabs(w), -7), std::ldexp(std::fabs(g), -7));
  return std::fabs(g - w) <= ulp || std::fabs(g - w) < 1e-38f;
}

void check_backward(int64_t rows, int64_t inter, const Form& form, bool weighted, bool strided,
                    uint64_t seed) {
  const int64_t ld = 2 * inter + (strided ? 64 : 0), ld_dh = inter + (strided ? 8 : 0);
  const int64_t ld_d = 2 * inter + (strided ? 16 : 0);
  const Rows which = make_rows(rows, form);
  std::vector<bf16> gu = random_bf16(rows, ld, seed, 1.0f);
  std::vector<bf16> dh = random_bf16(rows, ld_dh, seed + 1, 1.0f);
  poison_padding(gu, rows, ld, which);
  poison_padding(dh, rows, ld_dh, which);
  std::vector<float> w(rows);
  std::mt19937_64 rng(seed + 7);
  std::uniform_real_distribution<float> wd(0.0f, 2.0f);
  for (float& x : w) x = wd(rng);
  const int32_t* layout_h = which.layout.empty() ? nullptr : which.layout.data();
  const int32_t* masked_h = which.masked_m.empty() ? nullptr : which.masked_m.data();
  std::vector<bf16> want(rows * ld_d, bf16{0xFFFF});
  std::vector<float> want_drs(rows);
  kernels::swiglu_backward_reference(gu.data(), ld, dh.data(), ld_dh, rows, inter,
                                     weighted ? w.data() : nullptr, layout_h, masked_h,
                                     which.group_rows, want.data(), ld_d, want_drs.data());

  DeviceBuffer<bf16> d_gu(gu), d_dh(dh), d_out(rows * ld_d);
  DeviceBuffer<float> d_w(w), d_drs(rows);
  DeviceBuffer<int32_t> d_layout(which.layout), d_masked(which.masked_m);
  d_out.poison();
  d_drs.poison();
  const kernels::SwigluRows rows_arg{layout_h ? d_layout.get() : nullptr,
                                     masked_h ? d_masked.get() : nullptr, which.group_rows};
  kernels::swiglu_backward(d_gu.get(), ld, d_dh.get(), ld_dh, rows, inter,
                           weighted ? d_w.get() : nullptr, rows_arg, d_out.get(), ld_d, d_drs.get(),
                           nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<bf16> got = d_out.download();
  const std::vector<float> got_drs = d_drs.download();

  double err2 = 0.0, ref2 = 0.0;
  int64_t differ = 0, far = 0, bad_drs = 0, bad_pad = 0, n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < ld_d; ++j) {
      const bf16 g = got[r * ld_d + j], x = want[r * ld_d + j];
      if (j >= 2 * inter) {
        far += g.bits != 0xFFFF;  // past 2 * inter: untouched
        continue;
      }
      if (!which.real(r)) {
        bad_pad += g.bits != 0;
        continue;
      }
      const double a = to_float(g), b = to_float(x);
      err2 += (a - b) * (a - b);
      ref2 += b * b;
      ++n;
      differ += g.bits != x.bits;
      far += !within_one_bf16_ulp(g, x);
    }
    if (!which.real(r)) {
      bad_pad += got_drs[r] != 0.0f;
      continue;
    }
    double sum_abs = 0.0;
    for (int64_t j = 0; j < inter; ++j) {
      const float gj = to_float(gu[r * ld + j]), uj = to_float(gu[r * ld + inter + j]);
      sum_abs += std::fabs(to_float(dh[r * ld_dh + j]) * gj / (1.0f + std::exp(-gj)) * uj);
    }
    bad_drs += !(std::fabs(got_drs[r] - want_drs[r]) <= 1e-5 * sum_abs + 1e-30);
  }
  const double rel = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  std::printf("  swiglu bwd %5lld x %5lld %-10s w=%d: rel %.3e, bf16 differing %lld / %lld\n",
              static_cast<long long>(rows), static_cast<long long>(inter), form.name, weighted, rel,
              static_cast<long long>(differ), static_cast<long long>(n));
  EXPECT_EQ(bad_pad, 0) << "padding rows: zero gradients, d_row_scale 0";
  EXPECT_EQ(far, 0) << "elements beyond one BF16 ulp (or written past 2 * inter)";
  EXPECT_LE(differ, n / 1000 + 1);
  EXPECT_LE(rel, 1e-4);
  EXPECT_EQ(bad_drs, 0) << "d_row_scale beyond 1e-5 * sum |terms|";
}

TEST(SwigluGpu, BackwardMatchesReference) {
  uint64_t seed = 1000;
  int64_t k = 0;
  for (int64_t rows : {1, 5, 130, 4096 + 17})
    for (int64_t inter : {128, 2048, 7168})
      for (const Form& form : {kPlain, kPadded})
        for (bool weighted : {false, true}) {
          SCOPED_TRACE(testing::Message()
                       << rows << "x" << inter << " " << form.name << " w=" << weighted);
          check_backward(rows, inter, form, weighted, rows < 1000 && ++k % 3 == 0, seed += 2);
        }
  for (int64_t inter : {128, 2048, 7168})
    for (bool weighted : {false, true}) {
      SCOPED_TRACE(testing::Message() << "masked 4x96 x " << inter << " w=" << weighted);
      check_backward(4 * 96, inter, kMasked, weighted, false, seed += 2);
    }
}

// ---- non-finite inputs: counted in real rows, padding rows' NaN ignored ----
TEST(SwigluGpu, NonFiniteReportCountsRealRowsOnly) {
  const int64_t rows = 64, inter = 256, ld = 2 * inter;
  for (const Form& form : {kPadded, Form{"masked4x16", false, 4}}) {
    SCOPED_TRACE(form.name);
    Rows which = make_rows(rows, form);
    if (form.groups > 0) which.masked_m = {16, 9, 0, 3};
    std::vector<bf16> gu = random_bf16(rows, ld, 77, 1.0f);
    poison_padding(gu, rows, ld, which);
    ASSERT_TRUE(which.real(2) && which.real(18) && !which.real(31));
    gu[2 * ld + 5] = to_bf16(std::numeric_limits<float>::quiet_NaN());          // g of row 2
    gu[18 * ld + inter + 9] = to_bf16(std::numeric_limits<float>::infinity());  // u of row 18
    DeviceBuffer<bf16> d_gu(gu);
    DeviceBuffer<int32_t> d_layout(which.layout), d_masked(which.masked_m);
    DeviceBuffer<uint8_t> codes(rows * inter);
    DeviceBuffer<float> scales(rows * 2);
    DeviceBuffer<kernels::NonFiniteReport> report(1);
    kernels::reset_nonfinite(report.get(), nullptr);
    const kernels::SwigluRows rows_arg{which.layout.empty() ? nullptr : d_layout.get(),
                                       which.masked_m.empty() ? nullptr : d_masked.get(),
                                       which.group_rows};
    kernels::swiglu_quantize_1x128(d_gu.get(), ld, rows, inter, nullptr, rows_arg, false,
                                   codes.get(), inter, scales.get(), ScaleLayout::kRowMajor,
                                   nullptr, report.get());
    std::string msg;
    try {
      kernels::check_nonfinite(report.get(), "swiglu", nullptr);
    } catch (const Error& e) {
      msg = e.what();
    }
    EXPECT_NE(msg.find("swiglu: 2 non-finite input values (NaN, +inf); first at row 2, column 5"),
              std::string::npos)
        << msg;
  }
}

}  // namespace
}  // namespace fp8moe
