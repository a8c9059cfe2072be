#include "fp8moe/fp8/quantize.h"

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <limits>

#include "fp8moe/fp8/codec.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fp8moe {

const char* granularity_name(ScaleGranularity g) {
  switch (g) {
    case ScaleGranularity::kPerTensor:
      return "per-tensor";
    case ScaleGranularity::k1x128:
      return "1x128";
    case ScaleGranularity::k128x128:
      return "128x128";
  }
  return "?";
}

float fp8_scale_for_amax(float amax, bool pow2_scales) {
  // NOTE: an all-zero tile gets scale 1 so that dequantisation stays exact (0 * 1); tiny tiles
  // are floored at FLT_MIN so that x / scale can never overflow to infinity.
  float scale = amax > 0.0f ? std::max(amax / kE4M3Max, FLT_MIN) : 1.0f;
  if (pow2_scales) scale = round_up_pow2(scale);
  return scale;
}

namespace {

struct TileShape {
  int64_t rows, cols;
};

TileShape tile_shape(ScaleGranularity g, int64_t rows, int64_t cols) {
  switch (g) {
    case ScaleGranularity::kPerTensor:
      return {std::max<int64_t>(rows, 1), std::max<int64_t>(cols, 1)};
    case ScaleGranularity::k1x128:
      return {1, kQuantTile};
    case ScaleGranularity::k128x128:
      return {kQuantTile, kQuantTile};
  }
  return {1, 1};
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The largest |x| of a row segment; `finite` is cleared by any NaN or infinity. NOTE: the maximum
// of finite values does not depend on the order of comparisons, so the SIMD body and the scalar
// tail give exactly the scalar loop's amax.
float amax_of(const float* x, int64_t n, bool& finite) {
  int64_t c = 0;
  float amax = 0.0f;
#if defined(__SSE2__)
  if (n >= 4) {
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
    const __m128 flt_max = _mm_set1_ps(std::numeric_limits<float>::max());
    __m128 vmax = _mm_setzero_ps(), ok = _mm_castsi128_ps(_mm_set1_epi32(-1));
    for (; c + 4 <= n; c += 4) {
      const __m128 a = _mm_and_ps(_mm_loadu_ps(x + c), abs_mask);
      vmax = _mm_max_ps(vmax, a);
      ok = _mm_and_ps(ok, _mm_cmple_ps(a, flt_max));  // false for NaN and infinity
    }
    float lanes[4];
    _mm_storeu_ps(lanes, vmax);
    for (const float l : lanes) amax = std::max(amax, l);
    finite &= _mm_movemask_ps(ok) == 0xF;
  }
#endif
  for (; c < n; ++c) {
    const float a = std::fabs(x[c]);
    amax = std::max(amax, a);
    finite &= a <= std::numeric_limits<float>::max();
  }
  return amax;
}

// out[c] = float_to_e4m3_bits_finite_sat(x[c] / scale) for finite x.
void encode_e4m3(const float* x, int64_t n, float scale, uint8_t* out) {
  int64_t c = 0;
#if defined(__SSE2__)
  // NOTE: the same operations as float_to_e4m3_bits_finite_sat, four lanes at a time: an IEEE
  // division, integer bit arithmetic, one float multiply and one add (no FMA at the SSE2
  // baseline). Codes stay below 0x441, so signed compares and 16-bit minima are exact.
  const __m128 vscale = _mm_set1_ps(scale);
  const auto encode4 = [&](const float* p) {
    const __m128i u = _mm_castps_si128(_mm_div_ps(_mm_loadu_ps(p), vscale));
    const __m128i sign = _mm_and_si128(_mm_srli_epi32(u, 24), _mm_set1_epi32(0x80));
    const __m128i a = _mm_and_si128(u, _mm_set1_epi32(0x7FFFFFFF));
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(a, 20), _mm_set1_epi32(1));
    const __m128i normal = _mm_sub_epi32(
        _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(a, _mm_set1_epi32(0x7FFFF)), odd), 20),
        _mm_set1_epi32((127 - 7) << 3));
    const __m128 sub_f =
        _mm_add_ps(_mm_mul_ps(_mm_castsi128_ps(a), _mm_set1_ps(512.0f)), _mm_set1_ps(8388608.0f));
    const __m128i subnormal = _mm_sub_epi32(_mm_castps_si128(sub_f), _mm_set1_epi32(0x4B000000));
    const __m128i is_sub = _mm_cmplt_epi32(a, _mm_set1_epi32(0x3C800000));
    __m128i code = _mm_or_si128(_mm_and_si128(is_sub, subnormal), _mm_andnot_si128(is_sub, normal));
    code = _mm_min_epi16(code, _mm_set1_epi32(0x7E));  // high halves are 0, low halves < 0x441
    return _mm_or_si128(sign, code);
  };
  for (; c + 16 <= n; c += 16) {
    const __m128i lo = _mm_packs_epi32(encode4(x + c), encode4(x + c + 4));
    const __m128i hi = _mm_packs_epi32(encode4(x + c + 8), encode4(x + c + 12));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm_packus_epi16(lo, hi));
  }
#endif
  for (; c < n; ++c) out[c] = float_to_e4m3_bits_finite_sat(x[c] / scale);
}

}  // namespace

int64_t Fp8MatrixRef::tile_rows() const {
  return tile_shape(granularity, rows, cols).rows;
}
int64_t Fp8MatrixRef::tile_cols() const {
  return tile_shape(granularity, rows, cols).cols;
}
float Fp8MatrixRef::value(int64_t r, int64_t c) const {
  return e4m3_bits_to_float(codes[r * ld + c]) * scale(r, c);
}

int64_t QuantizedMatrix::scale_rows_count() const {
  return ceil_div(rows, tile_shape(granularity, rows, cols).rows);
}
int64_t QuantizedMatrix::scale_cols_count() const {
  return ceil_div(cols, tile_shape(granularity, rows, cols).cols);
}
Fp8MatrixRef fp8_matrix_ref(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols,
                            ScaleGranularity granularity) {
  Fp8MatrixRef r;
  r.codes = codes;
  r.rows = rows;
  r.cols = cols;
  r.ld = cols;
  r.scales = scales;
  r.granularity = granularity;
  r.scale_row_stride = ceil_div(cols, tile_shape(granularity, rows, cols).cols);
  r.scale_col_stride = 1;
  return r;
}
Fp8MatrixRef QuantizedMatrix::ref() const {
  return fp8_matrix_ref(codes.data(), scales.data(), rows, cols, granularity);
}

void quantize_into(const float* x, int64_t rows, int64_t cols, int64_t ld,
                   ScaleGranularity granularity, QuantizeOptions options, uint8_t* codes,
                   int64_t ld_codes, float* scales) {
  FM_CHECK_ARG(rows >= 0 && cols >= 0, "quantize: negative shape [", rows, ",", cols, "]");
  FM_CHECK_ARG(ld >= cols && ld_codes >= cols, "quantize: leading dimension ", ld, " / ", ld_codes,
               " smaller than cols=", cols);
  const TileShape tile = tile_shape(granularity, rows, cols);
  const int64_t tile_row_count = ceil_div(rows, tile.rows);
  const int64_t tile_col_count = ceil_div(cols, tile.cols);
  for (int64_t tr = 0; tr < tile_row_count; ++tr) {
    const int64_t r0 = tr * tile.rows, r1 = std::min(rows, r0 + tile.rows);
    for (int64_t tc = 0; tc < tile_col_count; ++tc) {
      const int64_t c0 = tc * tile.cols, c1 = std::min(cols, c0 + tile.cols);
      float amax = 0.0f;
      bool finite = true;  // NOTE: std::max drops NaN, so non-finite values are tracked apart
      for (int64_t r = r0; r < r1; ++r)
        amax = std::max(amax, amax_of(x + r * ld + c0, c1 - c0, finite));
      if (!finite) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c)
            FM_CHECK_ARG(std::isfinite(x[r * ld + c]), "quantize: non-finite value ", x[r * ld + c],
                         " at row ", r, ", column ", c);
      }
      const float scale = fp8_scale_for_amax(amax, options.pow2_scales);
      scales[tr * tile_col_count + tc] = scale;
      // NOTE: every value here is finite (checked above), so the branch-free encoder applies.
      for (int64_t r = r0; r < r1; ++r)
        encode_e4m3(x + r * ld + c0, c1 - c0, scale, codes + r * ld_codes + c0);
    }
  }
}

QuantizedMatrix quantize(const float* x, int64_t rows, int64_t cols, int64_t ld,
                         ScaleGranularity granularity, QuantizeOptions options) {
  QuantizedMatrix q;
  q.rows = rows;
  q.cols = cols;
  q.granularity = granularity;
  q.codes.resize(static_cast<size_t>(rows * cols));
  q.scales.resize(static_cast<size_t>(q.scale_rows_count() * q.scale_cols_count()));
  quantize_into(x, rows, cols, ld, granularity, options, q.codes.data(), cols, q.scales.data());
  return q;
}

std::vector<float> dequantize(const Fp8MatrixRef& q) {
  // NOTE: q.value(r, c) for every element, with the decoding tabled and the scale looked up
  // once per tile row segment: the same float product.
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_bits_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  std::vector<float> out(static_cast<size_t>(q.rows * q.cols));
  const int64_t tile = q.tile_cols();
  for (int64_t r = 0; r < q.rows; ++r) {
    const uint8_t* codes = q.codes + r * q.ld;
    float* row = out.data() + r * q.cols;
    for (int64_t c0 = 0; c0 < q.cols; c0 += tile) {
      const float s = q.scale(r, c0);
      for (int64_t c = c0; c < std::min(q.cols, c0 + tile); ++c) row[c] = lut[codes[c]] * s;
    }
  }
  return out;
}

int64_t padded_rows(int64_t rows, int64_t row_alignment) {
  return ceil_div(rows, row_alignment) * row_alignment;
}

std::vector<float> scales_mn_major(const QuantizedMatrix& q, int64_t row_alignment) {
  FM_CHECK_ARG(q.granularity == ScaleGranularity::k1x128,
               "scales_mn_major: expects 1x128 scales, got ", granularity_name(q.granularity));
  const int64_t kb = q.scale_cols_count();
  const int64_t mp = padded_rows(q.rows, row_alignment);
  std::vector<float> out(static_cast<size_t>(kb * mp), 0.0f);
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t b = 0; b < kb; ++b) out[b * mp + r] = q.scales[r * kb + b];
  return out;
}

}  // namespace fp8moe
