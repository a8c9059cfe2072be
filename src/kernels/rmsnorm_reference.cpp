// CPU references of the GPU RMSNorm (kernels/rmsnorm.h): the kernels' FP32 order of operations
// written out as loops (per-thread partials, the warp butterfly, the warp-order block sum, the
// two-stage dw), so that the GPU results are theirs bit for bit; the fused form quantises with
// fp8moe::quantize_into. Against model/ops.h's double-precision rmsnorm: tests/kernels/
// rmsnorm_test.cpp (`test_kernels --gtest_filter='RmsNorm*'`).
#include <cmath>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/rmsnorm.h"

namespace fp8moe::kernels {
namespace {

constexpr int kVec = RmsNormPlan::kVecPerThread;

// The block's row sum of term(i) over i < dim, in the kernels' order (rmsnorm.h).
template <class Term>
float block_row_sum(int64_t dim, int threads, const Term& term) {
  const int64_t nvec = dim / 8;
  std::vector<float> lane(static_cast<size_t>(threads), 0.0f);
  for (int t = 0; t < threads; ++t) {
    float acc = 0.0f;
    for (int k = 0; k < kVec; ++k) {
      const int64_t v = t + static_cast<int64_t>(k) * threads;
      if (v >= nvec) continue;
      for (int e = 0; e < 8; ++e) acc = acc + term(v * 8 + e);
    }
    lane[t] = acc;
  }
  float sum = 0.0f;
  for (int w = 0; w < threads / 32; ++w) {
    float s[32];
    for (int l = 0; l < 32; ++l) s[l] = lane[w * 32 + l];
    for (int o = 16; o > 0; o >>= 1) {
      float n[32];
      for (int l = 0; l < 32; ++l) n[l] = s[l] + s[l ^ o];
      for (int l = 0; l < 32; ++l) s[l] = n[l];
    }
    sum = sum + s[0];
  }
  return sum;
}

float rstd_of(float ss, int64_t dim, double eps) {
  const float mean = ss / static_cast<float>(dim);
  return 1.0f / std::sqrt(mean + static_cast<float>(eps));
}

}  // namespace

RmsNormPlan rmsnorm_plan(int64_t rows, int64_t dim) {
  RmsNormPlan p;
  const int64_t nvec = dim / 8;
  const int64_t per = (nvec + kVec - 1) / kVec;
  p.threads = static_cast<int>(std::max<int64_t>(32, (per + 31) / 32 * 32));
  p.chunk_rows = std::max<int64_t>(
      1, (rows + RmsNormPlan::kDwChunksTarget - 1) / RmsNormPlan::kDwChunksTarget);
  p.chunks = (rows + p.chunk_rows - 1) / p.chunk_rows;
  p.workspace_floats = p.chunks * dim;
  return p;
}

void check_rmsnorm_shape(const char* what, int64_t rows, int64_t dim, bool fused) {
  FM_CHECK_ARG(rows >= 0 && rows <= 0x7FFFFFFF, what, ": rows=", rows, " must be in [0, 2^31 - 1]");
  FM_CHECK_ARG(dim > 0 && dim % 8 == 0 && dim <= 16384, what, ": dim=", dim,
               " must be a positive multiple of 8 up to 16384");
  FM_CHECK_ARG(!fused || dim % 128 == 0, what, ": dim=", dim,
               " must be a multiple of 128 for the 1x128 quantisation");
}

void rmsnorm_forward_reference(const bf16* x, int64_t ld_x, const float* w, int64_t rows,
                               int64_t dim, double eps, bf16* y, int64_t ld_y, float* rstd) {
  check_rmsnorm_shape("rmsnorm_forward_reference", rows, dim, false);
  const int threads = rmsnorm_plan(rows, dim).threads;
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* xr = x + r * ld_x;
    const float ss = block_row_sum(dim, threads, [&](int64_t i) {
      const float xi = to_float(xr[i]);
      return xi * xi;
    });
    const float rs = rstd_of(ss, dim, eps);
    if (rstd != nullptr) rstd[r] = rs;
    if (y != nullptr)
      for (int64_t i = 0; i < dim; ++i) y[r * ld_y + i] = to_bf16(to_float(xr[i]) * rs * w[i]);
  }
}

void rmsnorm_forward_quantize_1x128_reference(const bf16* x, int64_t ld_x, const float* w,
                                              int64_t rows, int64_t dim, double eps, bf16* y,
                                              int64_t ld_y, float* rstd, bool pow2_scales,
                                              uint8_t* codes, int64_t ld_codes, float* scales,
                                              ScaleLayout layout) {
  check_rmsnorm_shape("rmsnorm_forward_quantize_1x128_reference", rows, dim, true);
  std::vector<bf16> yb(static_cast<size_t>(rows * dim));
  rmsnorm_forward_reference(x, ld_x, w, rows, dim, eps, yb.data(), dim, rstd);
  if (y != nullptr)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < dim; ++i) y[r * ld_y + i] = yb[r * dim + i];
  const int64_t tiles = dim / 128;
  std::vector<float> yf(static_cast<size_t>(dim)), row_scales(static_cast<size_t>(tiles));
  const int64_t padded = padded_rows(rows);
  if (layout == ScaleLayout::kMnMajor)
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t r = rows; r < padded; ++r) scales[t * padded + r] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < dim; ++i) yf[i] = to_float(yb[r * dim + i]);
    quantize_into(yf.data(), 1, dim, dim, ScaleGranularity::k1x128, {pow2_scales},
                  codes + r * ld_codes, dim, row_scales.data());
    for (int64_t t = 0; t < tiles; ++t)
      scales[layout == ScaleLayout::kRowMajor ? r * tiles + t : t * padded + r] = row_scales[t];
  }
}

void rmsnorm_backward_reference(const bf16* dy, int64_t ld_dy, const bf16* x, int64_t ld_x,
                                const float* w, const float* rstd, int64_t rows, int64_t dim,
                                bf16* dx, int64_t ld_dx, float* dw, bool accumulate) {
  check_rmsnorm_shape("rmsnorm_backward_reference", rows, dim, false);
  const RmsNormPlan plan = rmsnorm_plan(rows, dim);
  std::vector<float> partial(static_cast<size_t>(plan.chunks * dim), 0.0f);
  std::vector<float> dxr(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* xr = x + r * ld_x;
    const bf16* dyr = dy + r * ld_dy;
    const float rs = rstd[r];
    const float dot = block_row_sum(
        dim, plan.threads, [&](int64_t i) { return to_float(dyr[i]) * w[i] * to_float(xr[i]); });
    const float coef = dot * rs * rs * rs / static_cast<float>(dim);
    float* part = partial.data() + (r / plan.chunk_rows) * dim;
    for (int64_t i = 0; i < dim; ++i) {
      const float xi = to_float(xr[i]), dyi = to_float(dyr[i]);
      dxr[i] = rs * dyi * w[i] - coef * xi;
      part[i] = part[i] + dyi * xi * rs;
    }
    // NOTE: written after the row is read whole (dx may alias dy).
    for (int64_t i = 0; i < dim; ++i) dx[r * ld_dx + i] = to_bf16(dxr[i]);
  }
  const int64_t group = (plan.chunks + RmsNormPlan::kDwGroups - 1) / RmsNormPlan::kDwGroups;
  for (int64_t c = 0; c < dim; ++c) {
    float total = 0.0f;
    for (int j = 0; j < RmsNormPlan::kDwGroups; ++j) {
      float s = 0.0f;
      for (int64_t p = j * group; p < std::min(plan.chunks, (j + 1) * group); ++p)
        s = s + partial[p * dim + c];
      total = total + s;
    }
    dw[c] = accumulate ? dw[c] + total : total;
  }
}

}  // namespace fp8moe::kernels
