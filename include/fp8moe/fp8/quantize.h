// Fine-grained FP8 (E4M3) quantisation as DeepSeek-V3 prescribes:
//   activations  1x128 tiles: one scale per row per 128 columns (per token per 128 channels)
//   weights      128x128 blocks: one scale per 128 rows x 128 columns
//   per-tensor   one scale for the whole matrix (for comparison)
// scale = amax / 448 (the largest E4M3 value), so the tile's largest element maps to +-448;
// with pow2 scales the scale is rounded UP to a power of two, so no element can overflow.
// An all-zero tile gets scale 1 (its codes are all zero); scales never go below 2^-126 so that
// x / scale stays finite. Codes are to_e4m3(x / scale) (IEEE division, round-to-nearest-even,
// saturating): the GPU kernels compute exactly this.
// A last partial tile (cols or rows not a multiple of 128) has its own scale over the elements
// it has.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/core/error.h"

namespace fp8moe {

inline constexpr int64_t kQuantTile = 128;

enum class ScaleGranularity {
  kPerTensor,  // one scale
  k1x128,      // [rows, ceil(cols/128)]
  k128x128,    // [ceil(rows/128), ceil(cols/128)]
};
const char* granularity_name(ScaleGranularity g);

struct QuantizeOptions {
  bool pow2_scales = false;
};

// The scale for a tile whose largest magnitude is `amax` (see the header comment).
float fp8_scale_for_amax(float amax, bool pow2_scales);

// A non-owning view of a quantised matrix. Element (r, c) is e4m3 code codes[r*ld + c] times
// scales[(r / scale_rows) * scale_row_stride + (c / scale_cols) * scale_col_stride], where
// (scale_rows, scale_cols) is the tile shape: (1,128), (128,128) or (rows,cols) per tensor.
// Both the row-major layout of the CPU code and the M-major layout of the GPU kernels are
// expressible through the two strides.
struct Fp8MatrixRef {
  const uint8_t* codes = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  const float* scales = nullptr;
  ScaleGranularity granularity = ScaleGranularity::k1x128;
  int64_t scale_row_stride = 0, scale_col_stride = 0;

  int64_t tile_rows() const;
  int64_t tile_cols() const;
  float scale(int64_t r, int64_t c) const {
    return scales[(r / tile_rows()) * scale_row_stride + (c / tile_cols()) * scale_col_stride];
  }
  float value(int64_t r, int64_t c) const;  // dequantised element
};

// A view of a dense row-major FP8 matrix: codes [rows, cols] (ld = cols) and its scales row-major,
// one row of ceil(cols / tile cols) per tile row, as quantize() writes them.
Fp8MatrixRef fp8_matrix_ref(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols,
                            ScaleGranularity granularity);

// An owning quantised matrix: codes row-major [rows, cols]; scales row-major over tiles.
struct QuantizedMatrix {
  int64_t rows = 0, cols = 0;
  ScaleGranularity granularity = ScaleGranularity::k1x128;
  std::vector<uint8_t> codes;
  std::vector<float> scales;

  int64_t scale_rows_count() const;  // number of tile rows
  int64_t scale_cols_count() const;  // number of tile columns
  Fp8MatrixRef ref() const;
};

// Quantise x (row-major, leading dimension ld >= cols). A NaN or infinity anywhere is an error
// naming its position. rows and cols may be anything >= 0.
QuantizedMatrix quantize(const float* x, int64_t rows, int64_t cols, int64_t ld,
                         ScaleGranularity granularity, QuantizeOptions options = {});

// Quantise into caller-provided storage: codes [rows, ld_codes], scales row-major over tiles.
void quantize_into(const float* x, int64_t rows, int64_t cols, int64_t ld,
                   ScaleGranularity granularity, QuantizeOptions options, uint8_t* codes,
                   int64_t ld_codes, float* scales);

// Dequantise to float, row-major [rows, cols].
std::vector<float> dequantize(const Fp8MatrixRef& q);
inline std::vector<float> dequantize(const QuantizedMatrix& q) {
  return dequantize(q.ref());
}

// Scales of a 1x128 matrix rearranged M-major as TMA-fed GPU kernels read them:
// [ceil(cols/128), padded_rows] with padded_rows = rows rounded up to a multiple of
// `row_alignment` (4 floats = 16 bytes); padding entries are 0.
std::vector<float> scales_mn_major(const QuantizedMatrix& q, int64_t row_alignment = 4);
int64_t padded_rows(int64_t rows, int64_t row_alignment = 4);

}  // namespace fp8moe
