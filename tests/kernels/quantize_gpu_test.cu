// GPU quantisation kernels against the CPU fp8moe::quantize, bit for bit (codes and scales).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/quantize.h"
#include "gpu_test_util.cuh"

namespace fp8moe {
namespace {

using kernels::ScaleLayout;
using test::DeviceBuffer;

struct QuantCase {
  int64_t rows, cols;
};
// BF16 transposes of rows % 16 == 0 and cols % 8 == 0 take the vectorised kernel: {64, 7168},
// {128, 2112}, {96, 264} (partial tiles both ways), {256, 1024}; the others the generic one.
const QuantCase kCases[] = {{1, 128},    {3, 200},    {64, 7168}, {130, 300},
                            {257, 1536}, {128, 2112}, {96, 264},  {256, 1024}};

// Inputs as the kernel sees them: floats, or floats rounded to BF16 for the BF16 entry point.
template <typename T>
std::vector<T> to_input(const std::vector<float>& x);
template <>
std::vector<float> to_input<float>(const std::vector<float>& x) {
  return x;
}
template <>
std::vector<bf16> to_input<bf16>(const std::vector<float>& x) {
  std::vector<bf16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = to_bf16(x[i]);
  return out;
}
std::vector<float> as_float(const std::vector<float>& x) {
  return x;
}
std::vector<float> as_float(const std::vector<bf16>& x) {
  return test::bf16_to_float(x);
}

void expect_bytes_equal(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                        const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i] && bad++ == 0) first = i;
  EXPECT_EQ(bad, 0u) << what << ": first mismatch at " << first << " got " << int(got[first])
                     << " want " << int(want[first]);
}
void expect_floats_bitwise(const std::vector<float>& got, const std::vector<float>& want,
                           const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0 && bad++ == 0) first = i;
  EXPECT_EQ(bad, 0u) << what << ": first mismatch at " << first << " got " << got[first] << " want "
                     << want[first];
}

template <typename T>
void check_1x128(const QuantCase& qc, bool pow2, ScaleLayout layout, uint64_t seed) {
  const std::vector<T> in = to_input<T>(test::random_matrix(qc.rows, qc.cols, seed));
  const std::vector<float> xf = as_float(in);
  const QuantizedMatrix want =
      quantize(xf.data(), qc.rows, qc.cols, qc.cols, ScaleGranularity::k1x128, {pow2});
  const std::vector<float> want_scales =
      layout == ScaleLayout::kRowMajor ? want.scales : scales_mn_major(want);
  DeviceBuffer<T> x(in);
  DeviceBuffer<uint8_t> codes(want.codes.size());
  DeviceBuffer<float> scales(want_scales.size());
  codes.poison();
  scales.poison();
  kernels::quantize_1x128(x.get(), qc.rows, qc.cols, qc.cols, pow2, codes.get(), qc.cols,
                          scales.get(), layout, nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  expect_bytes_equal(codes.download(), want.codes, "1x128 codes");
  expect_floats_bitwise(scales.download(), want_scales, "1x128 scales");
}

TEST(QuantizeGpu, OneByOneTwentyEightMatchesCpuBitForBit) {
  uint64_t seed = 1;
  for (const QuantCase& qc : kCases)
    for (bool pow2 : {false, true})
      for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
        SCOPED_TRACE(testing::Message() << qc.rows << "x" << qc.cols << " pow2=" << pow2
                                        << " mn_major=" << (layout == ScaleLayout::kMnMajor));
        check_1x128<float>(qc, pow2, layout, seed++);
        check_1x128<bf16>(qc, pow2, layout, seed++);
      }
}

template <typename T>
void check_128x128(const QuantCase& qc, bool pow2, uint64_t seed) {
  const std::vector<T> in = to_input<T>(test::random_matrix(qc.rows, qc.cols, seed));
  const std::vector<float> xf = as_float(in);
  const QuantizedMatrix want =
      quantize(xf.data(), qc.rows, qc.cols, qc.cols, ScaleGranularity::k128x128, {pow2});
  DeviceBuffer<T> x(in);
  DeviceBuffer<uint8_t> codes(want.codes.size());
  DeviceBuffer<float> scales(want.scales.size());
  codes.poison();
  scales.poison();
  kernels::quantize_128x128(x.get(), qc.rows, qc.cols, qc.cols, pow2, codes.get(), qc.cols,
                            scales.get(), nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  expect_bytes_equal(codes.download(), want.codes, "128x128 codes");
  expect_floats_bitwise(scales.download(), want.scales, "128x128 scales");
}

TEST(QuantizeGpu, OneTwentyEightSquareMatchesCpuBitForBit) {
  uint64_t seed = 100;
  for (const QuantCase& qc : kCases)
    for (bool pow2 : {false, true}) {
      SCOPED_TRACE(testing::Message() << qc.rows << "x" << qc.cols << " pow2=" << pow2);
      check_128x128<float>(qc, pow2, seed++);
      check_128x128<bf16>(qc, pow2, seed++);
    }
}

// WeightQuantizer: several weights in one launch, one of them stacked into the halves of a
// shared w13 (gate, up) as ExpertWeightsFromMasters lays them out, against the CPU quantize()
// and a CPU transpose; every output poisoned first, the gaps between jobs must stay poisoned.
TEST(QuantizeGpu, WeightQuantizerMatchesCpuBitForBit) {
  struct Shape {
    int64_t n, k;
  };
  // n not a multiple of 128 (8, 200, 2112: zero-padded transposes), one block, many blocks.
  const Shape shapes[] = {{200, 384}, {8, 128}, {2112, 256}, {384, 1024}};
  uint64_t seed = 900;
  struct Owned {
    Shape s;
    int64_t np, nb, kb, ldt, ldst;
    std::vector<float> x;
    QuantizedMatrix want;
    std::unique_ptr<DeviceBuffer<float>> master, sw, swt;
    std::unique_ptr<DeviceBuffer<uint8_t>> w, wt;
  };
  std::vector<std::unique_ptr<Owned>> owned;
  std::vector<kernels::WeightQuantJob> jobs;
  for (const Shape& sh : shapes) {
    auto o = std::make_unique<Owned>();
    o->s = sh;
    o->np = (sh.n + 127) / 128 * 128;
    o->nb = o->np / 128;
    o->kb = sh.k / 128;
    o->ldt = o->np + 64;  // wider than needed: the columns past np must stay untouched
    o->ldst = o->nb + 3;
    o->x = test::random_matrix(sh.n, sh.k, seed++);
    o->want = quantize(o->x.data(), sh.n, sh.k, sh.k, ScaleGranularity::k128x128, {false});
    o->master = std::make_unique<DeviceBuffer<float>>(o->x);
    o->w = std::make_unique<DeviceBuffer<uint8_t>>(sh.n * sh.k);
    o->wt = std::make_unique<DeviceBuffer<uint8_t>>(sh.k * o->ldt);
    o->sw = std::make_unique<DeviceBuffer<float>>(o->nb * o->kb);
    o->swt = std::make_unique<DeviceBuffer<float>>(o->kb * o->ldst);
    o->w->poison();
    o->wt->poison();
    o->sw->poison();
    o->swt->poison();
    jobs.push_back({o->master->get(), sh.n, sh.k, o->w->get(), o->sw->get(), o->wt->get(), o->ldt,
                    o->swt->get(), o->ldst});
    owned.push_back(std::move(o));
  }
  // A stacked pair: two [256, 512] weights into one [512, 512] w13 and its [512][512] transpose.
  const int64_t I = 256, H = 512;
  const std::vector<float> gate = test::random_matrix(I, H, seed++),
                           up = test::random_matrix(I, H, seed++);
  DeviceBuffer<float> dgate(gate), dup(up);
  DeviceBuffer<uint8_t> w13(2 * I * H), w13t(2 * I * H);
  DeviceBuffer<float> s13(2 * I / 128 * H / 128), s13t(2 * I / 128 * H / 128);
  w13.poison();
  w13t.poison();
  s13.poison();
  s13t.poison();
  const int64_t half = I / 128 * H / 128;
  jobs.push_back(
      {dgate.get(), I, H, w13.get(), s13.get(), w13t.get(), 2 * I, s13t.get(), 2 * I / 128});
  jobs.push_back({dup.get(), I, H, w13.get() + I * H, s13.get() + half, w13t.get() + I, 2 * I,
                  s13t.get() + I / 128, 2 * I / 128});
  const kernels::WeightQuantizer quantizer(jobs);
  quantizer.run(nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());

  const uint8_t poison_byte = [] {
    DeviceBuffer<uint8_t> p(1);
    p.poison();
    return p.download()[0];
  }();
  const std::vector<float> poison_float = [] {
    DeviceBuffer<float> p(1);
    p.poison();
    return p.download();
  }();
  for (const auto& o : owned) {
    SCOPED_TRACE(testing::Message() << o->s.n << "x" << o->s.k);
    expect_bytes_equal(o->w->download(), o->want.codes, "codes");
    expect_floats_bitwise(o->sw->download(), o->want.scales, "scales");
    std::vector<uint8_t> wt_want(o->s.k * o->ldt, poison_byte);
    for (int64_t c = 0; c < o->s.k; ++c)
      for (int64_t r = 0; r < o->np; ++r)
        wt_want[c * o->ldt + r] = r < o->s.n ? o->want.codes[r * o->s.k + c] : uint8_t{0};
    expect_bytes_equal(o->wt->download(), wt_want, "transposed codes");
    std::vector<float> swt_want(o->kb * o->ldst, poison_float[0]);
    for (int64_t b = 0; b < o->nb; ++b)
      for (int64_t kb = 0; kb < o->kb; ++kb)
        swt_want[kb * o->ldst + b] = o->want.scales[b * o->kb + kb];
    expect_floats_bitwise(o->swt->download(), swt_want, "transposed scales");
  }
  // The stacked pair equals the CPU's quantisation of the stacked [2I, H] matrix.
  std::vector<float> stacked(gate);
  stacked.insert(stacked.end(), up.begin(), up.end());
  const QuantizedMatrix want =
      quantize(stacked.data(), 2 * I, H, H, ScaleGranularity::k128x128, {false});
  expect_bytes_equal(w13.download(), want.codes, "stacked codes");
  expect_floats_bitwise(s13.download(), want.scales, "stacked scales");
  std::vector<uint8_t> t_want(2 * I * H);
  for (int64_t c = 0; c < H; ++c)
    for (int64_t r = 0; r < 2 * I; ++r) t_want[c * 2 * I + r] = want.codes[r * H + c];
  expect_bytes_equal(w13t.download(), t_want, "stacked transposed codes");
  std::vector<float> st_want(want.scales.size());
  const int64_t nb = 2 * I / 128, kb = H / 128;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t k = 0; k < kb; ++k) st_want[k * nb + b] = want.scales[b * kb + k];
  expect_floats_bitwise(s13t.download(), st_want, "stacked transposed scales");

  // Bad jobs are refused with the job's index.
  std::vector<kernels::WeightQuantJob> bad = {jobs[0]};
  bad[0].k = 200;
  EXPECT_THROW(kernels::WeightQuantizer{bad}, Error);
  bad = {jobs[0]};
  bad[0].ldt = 128;
  EXPECT_THROW(kernels::WeightQuantizer{bad}, Error);
  bad = {jobs[0]};
  bad[0].master += 1;  // its rows are read 16 bytes at a time
  EXPECT_THROW(kernels::WeightQuantizer{bad}, Error);
}

template <typename T>
void check_transpose(const QuantCase& qc, bool pow2, ScaleLayout layout, uint64_t seed) {
  const std::vector<T> in = to_input<T>(test::random_matrix(qc.rows, qc.cols, seed));
  const std::vector<float> xf = as_float(in);
  std::vector<float> xt(xf.size());
  for (int64_t r = 0; r < qc.rows; ++r)
    for (int64_t c = 0; c < qc.cols; ++c) xt[c * qc.rows + r] = xf[r * qc.cols + c];
  const QuantizedMatrix want =
      quantize(xf.data(), qc.rows, qc.cols, qc.cols, ScaleGranularity::k1x128, {pow2});
  const QuantizedMatrix want_t =
      quantize(xt.data(), qc.cols, qc.rows, qc.rows, ScaleGranularity::k1x128, {pow2});
  const bool mn = layout == ScaleLayout::kMnMajor;
  const std::vector<float> ws = mn ? scales_mn_major(want) : want.scales;
  const std::vector<float> wst = mn ? scales_mn_major(want_t) : want_t.scales;
  DeviceBuffer<T> x(in);
  DeviceBuffer<uint8_t> codes(want.codes.size()), codes_t(want_t.codes.size());
  DeviceBuffer<float> scales(ws.size()), scales_t(wst.size());
  codes.poison();
  codes_t.poison();
  scales.poison();
  scales_t.poison();
  kernels::quantize_1x128_transpose(x.get(), qc.rows, qc.cols, qc.cols, pow2, codes.get(),
                                    scales.get(), codes_t.get(), scales_t.get(), layout, nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  expect_bytes_equal(codes.download(), want.codes, "cast codes");
  expect_floats_bitwise(scales.download(), ws, "cast scales");
  expect_bytes_equal(codes_t.download(), want_t.codes, "transposed codes");
  expect_floats_bitwise(scales_t.download(), wst, "transposed scales");
  // The transposed copy alone (codes and scales null).
  codes_t.poison();
  scales_t.poison();
  kernels::quantize_1x128_transpose(x.get(), qc.rows, qc.cols, qc.cols, pow2, nullptr, nullptr,
                                    codes_t.get(), scales_t.get(), layout, nullptr);
  FM_CHECK_CUDA(cudaDeviceSynchronize());
  expect_bytes_equal(codes_t.download(), want_t.codes, "transposed codes only");
  expect_floats_bitwise(scales_t.download(), wst, "transposed scales only");
}

TEST(QuantizeGpu, FusedCastTransposeMatchesCpuBitForBit) {
  uint64_t seed = 200;
  for (const QuantCase& qc : kCases)
    for (bool pow2 : {false, true})
      for (ScaleLayout layout : {ScaleLayout::kRowMajor, ScaleLayout::kMnMajor}) {
        SCOPED_TRACE(testing::Message() << qc.rows << "x" << qc.cols << " pow2=" << pow2
                                        << " mn_major=" << (layout == ScaleLayout::kMnMajor));
        check_transpose<float>(qc, pow2, layout, seed++);
        check_transpose<bf16>(qc, pow2, layout, seed++);
      }
}

// Runs `quantize` (a call of one entry point given the report) and returns check_nonfinite's
// message, or "" when it does not throw.
template <typename Fn>
std::string nonfinite_message(kernels::NonFiniteReport* report, Fn&& quantize, bool reset = true) {
  if (reset) kernels::reset_nonfinite(report, nullptr);
  quantize(report);
  try {
    kernels::check_nonfinite(report, "activations", nullptr);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

template <typename T>
void check_nonfinite_reports(uint64_t seed, int64_t rows = 257, int64_t cols = 300) {
  std::vector<float> xf = test::random_matrix(rows, cols, seed);
  std::vector<T> in = to_input<T>(xf);
  DeviceBuffer<uint8_t> codes(rows * cols), codes_t(rows * cols);
  DeviceBuffer<float> scales(4 * 264), scales_t(4 * 264);
  DeviceBuffer<kernels::NonFiniteReport> report(1);
  const auto one = [&](const DeviceBuffer<T>& x) {
    return [&](kernels::NonFiniteReport* r) {
      kernels::quantize_1x128(x.get(), rows, cols, cols, false, codes.get(), cols, scales.get(),
                              ScaleLayout::kMnMajor, nullptr, r);
    };
  };
  const auto square = [&](const DeviceBuffer<T>& x) {
    return [&](kernels::NonFiniteReport* r) {
      kernels::quantize_128x128(x.get(), rows, cols, cols, true, codes.get(), cols, scales.get(),
                                nullptr, r);
    };
  };
  const auto transpose = [&](const DeviceBuffer<T>& x) {
    return [&](kernels::NonFiniteReport* r) {
      kernels::quantize_1x128_transpose(x.get(), rows, cols, cols, false, codes.get(), scales.get(),
                                        codes_t.get(), scales_t.get(), ScaleLayout::kRowMajor,
                                        nullptr, r);
    };
  };
  {  // Finite input: no report, and the report changes nothing in the codes.
    DeviceBuffer<T> x(in);
    EXPECT_EQ(nonfinite_message(report.get(), one(x)), "");
    const QuantizedMatrix want =
        quantize(as_float(in).data(), rows, cols, cols, ScaleGranularity::k1x128, {false});
    expect_bytes_equal(codes.download(), want.codes, "1x128 codes with a report");
    EXPECT_EQ(nonfinite_message(report.get(), square(x)), "");
    EXPECT_EQ(nonfinite_message(report.get(), transpose(x)), "");
  }
  const float inf = std::numeric_limits<float>::infinity();
  in[200 * cols + 17] = to_input<T>({inf})[0];
  in[3 * cols + 299] = to_input<T>({std::numeric_limits<float>::quiet_NaN()})[0];
  in[3 * cols + 5] = to_input<T>({-inf})[0];
  DeviceBuffer<T> x(in);
  const std::string want = "3 non-finite input values (NaN, +inf, -inf); first at row 3, column 5";
  for (const std::string& got :
       {nonfinite_message(report.get(), one(x)), nonfinite_message(report.get(), square(x)),
        nonfinite_message(report.get(), transpose(x))})
    EXPECT_NE(got.find("activations: " + want), std::string::npos) << got;
  // Without a reset the report accumulates over calls (e.g. one check per training step).
  const std::string twice = nonfinite_message(report.get(), one(x), /*reset=*/false);
  EXPECT_NE(twice.find("6 non-finite input values"), std::string::npos) << twice;
  // Tiles without a bad value are still quantised exactly.
  kernels::quantize_1x128(x.get(), rows, cols, cols, false, codes.get(), cols, scales.get(),
                          ScaleLayout::kRowMajor, nullptr, report.get());
  const std::vector<uint8_t> got = codes.download();
  const std::vector<float> row100(xf.begin() + 100 * cols, xf.begin() + 101 * cols);
  const std::vector<float> row100_in = as_float(to_input<T>(row100));
  const QuantizedMatrix clean =
      quantize(row100_in.data(), 1, cols, cols, ScaleGranularity::k1x128, {false});
  expect_bytes_equal(std::vector<uint8_t>(got.begin() + 100 * cols, got.begin() + 101 * cols),
                     clean.codes, "clean row next to bad ones");
}

TEST(QuantizeGpu, NonFiniteInputsAreReportedWithTheirFirstPosition) {
  check_nonfinite_reports<float>(300);
  check_nonfinite_reports<bf16>(301);
  check_nonfinite_reports<bf16>(302, 272, 304);  // the vectorised BF16 transpose
  DeviceBuffer<float> x(1 << 24);
  DeviceBuffer<uint8_t> codes(1 << 24);
  DeviceBuffer<float> scales(1 << 17);
  DeviceBuffer<kernels::NonFiniteReport> report(1);
  EXPECT_THROW(kernels::quantize_1x128(x.get(), 1, 1 << 24, 1 << 24, false, codes.get(), 1 << 24,
                                       scales.get(), ScaleLayout::kRowMajor, nullptr, report.get()),
               Error);
}

TEST(QuantizeGpu, RejectsBadArguments) {
  DeviceBuffer<float> x(256);
  DeviceBuffer<uint8_t> codes(256);
  DeviceBuffer<float> scales(8);
  EXPECT_THROW(kernels::quantize_1x128(x.get(), 2, 128, 100, false, codes.get(), 128, scales.get(),
                                       ScaleLayout::kRowMajor, nullptr),
               Error);
  EXPECT_THROW(kernels::quantize_1x128(x.get(), 2, 128, 128, false, codes.get(), 64, scales.get(),
                                       ScaleLayout::kRowMajor, nullptr),
               Error);
  EXPECT_THROW(
      kernels::quantize_1x128_transpose(x.get(), 2, 128, 128, false, codes.get(), nullptr,
                                        codes.get(), scales.get(), ScaleLayout::kRowMajor, nullptr),
      Error);
}

}  // namespace
}  // namespace fp8moe
