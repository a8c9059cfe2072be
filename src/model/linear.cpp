#include "fp8moe/model/linear.h"

#include <algorithm>
#include <array>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/model/ops.h"

namespace fp8moe {

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kFp32:
      return "fp32";
    case Precision::kBf16:
      return "bf16";
    case Precision::kFp8:
      return "fp8";
  }
  return "?";
}

Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "bf16") return Precision::kBf16;
  if (name == "fp8") return Precision::kFp8;
  FM_THROW(ErrorKind::kInvalidArgument, "unknown precision '", name,
           "' (expected fp32, bf16 or fp8)");
}

namespace {

int threads_of(const LinearOptions& o) {
  return o.threads > 0 ? o.threads : model_threads();
}

void round_bf16_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_to_bf16(x[i]);
}

std::vector<float> rounded_bf16(const float* x, int64_t n) {
  std::vector<float> out(x, x + n);
  round_bf16_inplace(out.data(), n);
  return out;
}

// quantize() split over row ranges on the model's threads: tiles never straddle a range
// boundary (a 1x128 tile is one row; 128x128 ranges are cut at multiples of 128), so the codes
// and scales are exactly quantize()'s.
QuantizedMatrix quantize_threaded(const float* x, int64_t rows, int64_t cols, ScaleGranularity g,
                                  QuantizeOptions qo, int threads) {
  QuantizedMatrix q;
  q.rows = rows;
  q.cols = cols;
  q.granularity = g;
  const int64_t unit = g == ScaleGranularity::k128x128 ? kQuantTile : 1;
  const int64_t units = (rows + unit - 1) / unit;
  const int64_t scols = (cols + kQuantTile - 1) / kQuantTile;
  q.codes.resize(static_cast<size_t>(rows * cols));
  q.scales.resize(static_cast<size_t>(units * scols));
  if (rows == 0 || cols == 0) return quantize(x, rows, cols, cols, g, qo);
  parallel_for(
      units,
      [&](int64_t u0, int64_t u1) {
        const int64_t r0 = u0 * unit, r1 = std::min(rows, u1 * unit);
        quantize_into(x + r0 * cols, r1 - r0, cols, cols, g, qo, q.codes.data() + r0 * cols, cols,
                      q.scales.data() + u0 * scols);
      },
      threads, g == ScaleGranularity::k128x128 ? 1 : 64);
  return q;
}

// dequantize(q) transposed: out[c * rows + r] = q.value(r, c), the same float products, in
// 32x32 tiles so that both sides stay in cache.
void dequantize_transposed(const QuantizedMatrix& q, float* out) {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_bits_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  const Fp8MatrixRef ref = q.ref();
  constexpr int64_t kTile = 32;
  static_assert(kQuantTile % kTile == 0, "a tile of the transpose must not straddle a scale tile");
  for (int64_t r0 = 0; r0 < q.rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < q.cols; c0 += kTile) {
      const int64_t r1 = std::min(q.rows, r0 + kTile), c1 = std::min(q.cols, c0 + kTile);
      float scale[kTile];
      for (int64_t r = r0; r < r1; ++r) scale[r - r0] = ref.scale(r, c0);
      for (int64_t c = c0; c < c1; ++c) {
        const uint8_t* codes = q.codes.data() + c;
        float* dst = out + c * q.rows;
        for (int64_t r = r0; r < r1; ++r) dst[r] = lut[codes[r * q.cols]] * scale[r - r0];
      }
    }
}

}  // namespace

QuantizedMatrix transpose_block_quantized(const QuantizedMatrix& q) {
  FM_CHECK(q.granularity == ScaleGranularity::k128x128, "expects a 128x128-block matrix");
  QuantizedMatrix t;
  t.rows = q.cols;
  t.cols = q.rows;
  t.granularity = ScaleGranularity::k128x128;
  t.codes.resize(q.codes.size());
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) t.codes[c * q.rows + r] = q.codes[r * q.cols + c];
  const int64_t sr = q.scale_rows_count(), sc = q.scale_cols_count();
  t.scales.resize(q.scales.size());
  for (int64_t r = 0; r < sr; ++r)
    for (int64_t c = 0; c < sc; ++c) t.scales[c * sr + r] = q.scales[r * sc + c];
  return t;
}

void linear_forward(const LinearOptions& o, const float* x, int64_t m, const float* w, int64_t n,
                    int64_t k, float* y, LinearCache* cache) {
  FM_CHECK(cache != nullptr, "linear_forward needs a cache");
  cache->m = m;
  cache->n = n;
  cache->k = k;
  const int threads = threads_of(o);
  switch (o.precision) {
    case Precision::kFp32:
      cache->x.assign(x, x + m * k);
      gemm_f32(m, n, k, x, k, false, w, k, true, y, n, false, threads);
      return;
    case Precision::kBf16:
      cache->x = rounded_bf16(x, m * k);
      cache->w = rounded_bf16(w, n * k);
      gemm_f32(m, n, k, cache->x.data(), k, false, cache->w.data(), k, true, y, n, false, threads);
      round_bf16_inplace(y, m * n);
      return;
    case Precision::kFp8: {
      QuantizeOptions qo;
      qo.pow2_scales = o.pow2_activation_scales;
      cache->xq = quantize_threaded(x, m, k, ScaleGranularity::k1x128, qo, threads);
      cache->wq = quantize_threaded(w, n, k, ScaleGranularity::k128x128, {}, threads);
      if (m > 0)
        gemm_fp8_reference(cache->xq.ref(), cache->wq.ref(), y, n, AccumulatorModel{}, false,
                           threads);
      round_bf16_inplace(y, m * n);
      return;
    }
  }
}

void linear_backward(const LinearOptions& o, const LinearCache& c, const float* w, const float* dy,
                     float* dx, float* dw) {
  const int64_t m = c.m, n = c.n, k = c.k;
  if (m == 0) {
    if (dx) std::fill(dx, dx + m * k, 0.0f);
    return;
  }
  const int threads = threads_of(o);
  switch (o.precision) {
    case Precision::kFp32:
      if (dx) gemm_f32(m, k, n, dy, n, false, w, k, false, dx, k, false, threads);
      gemm_f32(n, k, m, dy, n, true, c.x.data(), k, false, dw, k, true, threads);
      return;
    case Precision::kBf16: {
      const std::vector<float> dyb = rounded_bf16(dy, m * n);
      if (dx) {
        gemm_f32(m, k, n, dyb.data(), n, false, c.w.data(), k, false, dx, k, false, threads);
        round_bf16_inplace(dx, m * k);
      }
      gemm_f32(n, k, m, dyb.data(), n, true, c.x.data(), k, false, dw, k, true, threads);
      return;
    }
    case Precision::kFp8: {
      // Dgrad: dx[M,K] = dy[M,N] * (W^T)[K,N]^T
      if (dx) {
        const QuantizedMatrix dyq =
            quantize_threaded(dy, m, n, ScaleGranularity::k1x128, {}, threads);
        const QuantizedMatrix wtq = transpose_block_quantized(c.wq);
        gemm_fp8_reference(dyq.ref(), wtq.ref(), dx, k, AccumulatorModel{}, false, threads);
        round_bf16_inplace(dx, m * k);
      }
      // Wgrad: dW[N,K] += dy^T[N,M] * (x^T)[K,M]^T, both quantised 1x128 along the tokens;
      // x comes back from its FP8 cache and is re-quantised along the other axis.
      std::vector<float> dyt(static_cast<size_t>(n * m));
      transpose(dy, m, n, dyt.data());
      std::vector<float> xt(static_cast<size_t>(k * m));
      dequantize_transposed(c.xq, xt.data());
      QuantizeOptions qo;
      qo.pow2_scales = o.pow2_activation_scales;
      const QuantizedMatrix dytq =
          quantize_threaded(dyt.data(), n, m, ScaleGranularity::k1x128, {}, threads);
      const QuantizedMatrix xtq =
          quantize_threaded(xt.data(), k, m, ScaleGranularity::k1x128, qo, threads);
      gemm_fp8_reference(dytq.ref(), xtq.ref(), dw, k, AccumulatorModel{}, true, threads);
      return;
    }
  }
}

}  // namespace fp8moe
