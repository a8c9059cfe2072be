// CPU reference of requantize_1x128_transpose (kernels/requantize.h): dequantise each element as
// Fp8MatrixRef::value does (one float multiply), zero the padding rows, and quantise the transpose
// with fp8moe::quantize_into (1x128), so that codes and scales are its own bit for bit.
// Tested by tests/kernels/requantize_test.cpp (`test_kernels --gtest_filter='Requant*'`).
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/requantize.h"

namespace fp8moe::kernels {

void requantize_1x128_transpose_reference(const uint8_t* codes, int64_t ld, const float* scales,
                                          ScaleLayout layout, int64_t rows, int64_t cols,
                                          const int32_t* grouped_layout, bool pow2_scales,
                                          uint8_t* codes_t, float* scales_t) {
  constexpr const char* kName = "requantize_1x128_transpose_reference";
  FM_CHECK_ARG(rows >= 0 && rows % 128 == 0, kName, ": rows=", rows,
               " is not a multiple of 128 (one expert per 128-row tile)");
  FM_CHECK_ARG(cols > 0 && cols % 128 == 0, kName, ": cols=", cols,
               " is not a positive multiple of 128");
  FM_CHECK_ARG(ld >= cols, kName, ": ld=", ld, " < cols=", cols);
  if (rows == 0) return;
  FM_CHECK_ARG(codes != nullptr && scales != nullptr && codes_t != nullptr && scales_t != nullptr,
               kName, ": null codes, scales, codes_t or scales_t");
  const int64_t kb = cols / 128, prow = padded_rows(rows), pcol = padded_rows(cols);
  // v^T [cols, rows]; padding rows (and a zero scale) give +0 whatever the codes.
  std::vector<float> vt(static_cast<size_t>(cols * rows));
  for (int64_t r = 0; r < rows; ++r) {
    const bool real = grouped_layout == nullptr || grouped_layout[r] >= 0;
    for (int64_t c = 0; c < cols; ++c) {
      const float s = !real                             ? 0.0f
                      : layout == ScaleLayout::kMnMajor ? scales[(c / 128) * prow + r]
                                                        : scales[r * kb + c / 128];
      vt[c * rows + r] = s == 0.0f ? 0.0f : e4m3_bits_to_float(codes[r * ld + c]) * s;
    }
  }
  std::vector<float> row_major(static_cast<size_t>(cols * (rows / 128)));
  QuantizeOptions options;
  options.pow2_scales = pow2_scales;
  quantize_into(vt.data(), cols, rows, rows, ScaleGranularity::k1x128, options, codes_t, rows,
                row_major.data());
  for (int64_t b = 0; b < rows / 128; ++b) {
    for (int64_t c = 0; c < cols; ++c) scales_t[b * pcol + c] = row_major[c * (rows / 128) + b];
    for (int64_t c = cols; c < pcol; ++c) scales_t[b * pcol + c] = 0.0f;
  }
}

}  // namespace fp8moe::kernels
