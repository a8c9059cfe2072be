// CPU references of the fused SwiGLU + 1x128 quantisation and its backward (kernels/swiglu.h):
// plain loops with model/ops.h's swiglu arithmetic (std::exp, IEEE division, no FMA) and the
// quantisation of fp8moe::quantize_into, so that codes and scales are its own bit for bit.
// Tested by tests/kernels/swiglu_test.cpp (`test_kernels --gtest_filter='Swiglu*'`).
#include <cmath>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/swiglu.h"

namespace fp8moe::kernels {
namespace {

// Which rows are real (see SwigluRows), checked as the kernels check them.
struct RowsRef {
  const int32_t* grouped_layout;
  const int32_t* masked_m;
  int64_t group_rows;

  bool real(int64_t r) const {
    if (grouped_layout != nullptr) return grouped_layout[r] >= 0;
    if (masked_m != nullptr) return r % group_rows < masked_m[r / group_rows];
    return true;
  }
};

void check_rows(const char* name, int64_t rows, int64_t inter, const RowsRef& which) {
  FM_CHECK_ARG(rows >= 0, name, ": negative rows ", rows);
  FM_CHECK_ARG(inter > 0 && inter % 128 == 0, name, ": inter=", inter,
               " must be a positive multiple of 128");
  FM_CHECK_ARG(which.grouped_layout == nullptr || which.masked_m == nullptr, name,
               ": both grouped_layout and masked_m given");
  FM_CHECK_ARG(which.masked_m != nullptr || which.group_rows == 0, name,
               ": group_rows=", which.group_rows, " without masked_m");
  FM_CHECK_ARG(which.masked_m == nullptr || (which.group_rows > 0 && rows % which.group_rows == 0),
               name, ": masked form needs group_rows > 0 dividing rows (rows=", rows,
               ", group_rows=", which.group_rows, ")");
}

float sigmoid(float g) {
  return 1.0f / (1.0f + std::exp(-g));
}

}  // namespace

void swiglu_quantize_1x128_reference(const bf16* gate_up, int64_t ld, int64_t rows, int64_t inter,
                                     const float* row_scale, const int32_t* grouped_layout,
                                     const int32_t* masked_m, int64_t group_rows, bool pow2_scales,
                                     uint8_t* codes, int64_t ld_codes, float* scales,
                                     ScaleLayout layout) {
  const RowsRef which{grouped_layout, masked_m, group_rows};
  check_rows("swiglu_quantize_1x128_reference", rows, inter, which);
  FM_CHECK_ARG(ld >= 2 * inter, "swiglu_quantize_1x128_reference: ld=", ld,
               " < 2 * inter=", 2 * inter);
  FM_CHECK_ARG(ld_codes >= inter, "swiglu_quantize_1x128_reference: ld_codes=", ld_codes,
               " < inter=", inter);
  const int64_t tiles = inter / 128;
  // Scale entry of (row, tile), and the M-major padding entries (0), per layout and form.
  const bool masked = masked_m != nullptr;
  const int64_t per_group = masked ? group_rows : rows;  // rows of one scale block
  const int64_t padded = layout == ScaleLayout::kMnMajor ? padded_rows(per_group) : per_group;
  const int64_t groups = masked ? rows / group_rows : 1;
  const auto scale_at = [&](int64_t r, int64_t t) -> float& {
    if (layout == ScaleLayout::kRowMajor) return scales[r * tiles + t];
    const int64_t g = r / per_group, rr = r % per_group;
    return scales[(g * tiles + t) * padded + rr];
  };
  if (layout == ScaleLayout::kMnMajor)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t rr = per_group; rr < padded; ++rr)
          scales[(g * tiles + t) * padded + rr] = 0.0f;

  std::vector<float> h(static_cast<size_t>(inter)), row_scales(static_cast<size_t>(tiles));
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* out = codes + r * ld_codes;
    if (!which.real(r)) {  // never read: what quantising a zero row gives
      for (int64_t j = 0; j < inter; ++j) out[j] = 0;
      for (int64_t t = 0; t < tiles; ++t) scale_at(r, t) = 1.0f;
      continue;
    }
    const bf16* g = gate_up + r * ld;
    const bf16* u = g + inter;
    for (int64_t j = 0; j < inter; ++j) {
      const float gj = to_float(g[j]);
      h[j] = gj * sigmoid(gj) * to_float(u[j]);  // model/ops.h's swiglu_forward
      if (row_scale != nullptr) h[j] *= row_scale[r];
    }
    quantize_into(h.data(), 1, inter, inter, ScaleGranularity::k1x128, {pow2_scales}, out, inter,
                  row_scales.data());
    for (int64_t t = 0; t < tiles; ++t) scale_at(r, t) = row_scales[t];
  }
}

void swiglu_backward_reference(const bf16* gate_up, int64_t ld, const bf16* dh, int64_t ld_dh,
                               int64_t rows, int64_t inter, const float* row_scale,
                               const int32_t* grouped_layout, const int32_t* masked_m,
                               int64_t group_rows, bf16* d_gate_up, int64_t ld_d,
                               float* d_row_scale) {
  const RowsRef which{grouped_layout, masked_m, group_rows};
  check_rows("swiglu_backward_reference", rows, inter, which);
  FM_CHECK_ARG(ld >= 2 * inter && ld_d >= 2 * inter && ld_dh >= inter,
               "swiglu_backward_reference: leading dimensions ld=", ld, ", ld_d=", ld_d,
               " (>= 2 * inter=", 2 * inter, "), ld_dh=", ld_dh, " (>= inter)");
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dg = d_gate_up + r * ld_d;
    bf16* du = dg + inter;
    if (!which.real(r)) {
      for (int64_t j = 0; j < 2 * inter; ++j) dg[j] = bf16{0};
      if (d_row_scale != nullptr) d_row_scale[r] = 0.0f;
      continue;
    }
    const bf16* g = gate_up + r * ld;
    const bf16* u = g + inter;
    const bf16* d = dh + r * ld_dh;
    double sum = 0.0;
    for (int64_t j = 0; j < inter; ++j) {
      // model/ops.h's swiglu_backward with da = dh * w.
      const float gj = to_float(g[j]), uj = to_float(u[j]), dj = to_float(d[j]);
      const float s = sigmoid(gj);
      const float silu = gj * s;
      const float da = row_scale != nullptr ? dj * row_scale[r] : dj;
      du[j] = to_bf16(da * silu);
      dg[j] = to_bf16(da * uj * s * (1.0f + gj * (1.0f - s)));
      sum += static_cast<double>(dj * silu * uj);
    }
    // NOTE: summed in double: the reference of an FP32 sum whose order the kernel chooses.
    if (d_row_scale != nullptr) d_row_scale[r] = static_cast<float>(sum);
  }
}

}  // namespace fp8moe::kernels
