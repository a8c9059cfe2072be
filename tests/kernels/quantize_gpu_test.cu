// GPU quantisation kernels against the CPU fp8moe::quantize, bit for bit (codes and scales).
#include <gtest/gtest.h>

#include <cstdio>
#include <limits>
#include <string>

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
