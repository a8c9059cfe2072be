// The routed experts' FP8 FFN on the CPU (moe/expert_ffn_reference.h): weight quantisation into
// the grouped GEMMs' layout and the per-expert reference.
#include "fp8moe/moe/expert_ffn_reference.h"

#include <algorithm>
#include <string>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/requantize.h"
#include "fp8moe/kernels/swiglu.h"

namespace fp8moe {

namespace {

void check_dims(int64_t groups, int64_t hidden, int64_t inter, const char* what) {
  FM_CHECK_ARG(groups >= 1, what, ": groups=", groups, " (at least one expert)");
  FM_CHECK_ARG(hidden > 0 && hidden % 128 == 0, what, ": hidden=", hidden,
               " is not a positive multiple of 128 (the scale block)");
  FM_CHECK_ARG(inter > 0 && inter % 128 == 0, what, ": inter=", inter,
               " is not a positive multiple of 128 (the scale block)");
}

// quantize_into 128x128 with the tensor and expert named in an error.
void quantize_block(const float* x, int64_t rows, int64_t cols, QuantizeOptions options,
                    uint8_t* codes, float* scales, const char* tensor, int64_t expert) {
  try {
    quantize_into(x, rows, cols, cols, ScaleGranularity::k128x128, options, codes, cols, scales);
  } catch (const Error& e) {
    FM_THROW(e.kind(), "quantize_expert_weights: ", tensor, " of expert ", expert, ": ",
             e.message());
  }
}

}  // namespace

Fp8MatrixRef ExpertWeightsHost::w13_ref(int64_t expert) const {
  FM_CHECK_ARG(expert >= 0 && expert < groups, "ExpertWeightsHost: expert ", expert, " of ",
               groups);
  const int64_t n = 2 * inter;
  return fp8_matrix_ref(w13.data() + expert * n * hidden,
                        s13.data() + expert * (n / 128) * (hidden / 128), n, hidden,
                        ScaleGranularity::k128x128);
}

Fp8MatrixRef ExpertWeightsHost::w2_ref(int64_t expert) const {
  FM_CHECK_ARG(expert >= 0 && expert < groups, "ExpertWeightsHost: expert ", expert, " of ",
               groups);
  return fp8_matrix_ref(w2.data() + expert * hidden * inter,
                        s2.data() + expert * (hidden / 128) * (inter / 128), hidden, inter,
                        ScaleGranularity::k128x128);
}

ExpertWeightsHost quantize_expert_weights(const float* gate, const float* up, const float* down,
                                          int64_t groups, int64_t hidden, int64_t inter,
                                          QuantizeOptions options) {
  check_dims(groups, hidden, inter, "quantize_expert_weights");
  FM_CHECK_ARG(gate != nullptr && up != nullptr && down != nullptr,
               "quantize_expert_weights: null weights (gate ", gate == nullptr ? "null" : "set",
               ", up ", up == nullptr ? "null" : "set", ", down ", down == nullptr ? "null" : "set",
               ")");
  const int64_t G = groups, H = hidden, I = inter;
  ExpertWeightsHost w;
  w.groups = G;
  w.hidden = H;
  w.inter = I;
  w.w13.resize(G * 2 * I * H);
  w.s13.resize(G * (2 * I / 128) * (H / 128));
  w.w2.resize(G * H * I);
  w.s2.resize(G * (H / 128) * (I / 128));
  for (int64_t g = 0; g < G; ++g) {
    // NOTE: I is a multiple of 128, so the up rows start on a 128-row block: quantising gate and
    // up apart gives the blocks of quantising the concatenation [gate; up].
    uint8_t* w13 = w.w13.data() + g * 2 * I * H;
    float* s13 = w.s13.data() + g * (2 * I / 128) * (H / 128);
    quantize_block(gate + g * I * H, I, H, options, w13, s13, "gate", g);
    quantize_block(up + g * I * H, I, H, options, w13 + I * H, s13 + (I / 128) * (H / 128), "up",
                   g);
    quantize_block(down + g * H * I, H, I, options, w.w2.data() + g * H * I,
                   w.s2.data() + g * (H / 128) * (I / 128), "down", g);
  }
  return w;
}

void expert_ffn_reference(const Fp8MatrixRef& x, const int32_t* grouped_layout,
                          const ExpertWeightsHost& weights, const float* row_scale,
                          bool pow2_scales, bf16* y, const AccumulatorModel& model, int threads) {
  const int64_t G = weights.groups, H = weights.hidden, I = weights.inter, rows = x.rows;
  check_dims(G, H, I, "expert_ffn_reference");
  FM_CHECK_ARG(x.cols == H, "expert_ffn_reference: x has ", x.cols, " columns, hidden is ", H);
  FM_CHECK_ARG(x.granularity == ScaleGranularity::k1x128,
               "expert_ffn_reference: x must be 1x128-scaled, is ",
               granularity_name(x.granularity));
  FM_CHECK_ARG(weights.w13.size() == static_cast<size_t>(G * 2 * I * H) &&
                   weights.s13.size() == static_cast<size_t>(G * (2 * I / 128) * (H / 128)) &&
                   weights.w2.size() == static_cast<size_t>(G * H * I) &&
                   weights.s2.size() == static_cast<size_t>(G * (H / 128) * (I / 128)),
               "expert_ffn_reference: weight arrays do not match groups=", G, " hidden=", H,
               " inter=", I);
  if (rows == 0) return;
  FM_CHECK_ARG(grouped_layout != nullptr && y != nullptr,
               "expert_ffn_reference: null grouped_layout or y");
  for (int64_t r = 0; r < rows; ++r)
    FM_CHECK_ARG(grouped_layout[r] < G, "expert_ffn_reference: row ", r, " names expert ",
                 grouped_layout[r], " of ", G);

  const int64_t KB = H / 128, IB = I / 128;
  for (int64_t e = 0; e < G; ++e) {
    std::vector<int64_t> mine;
    for (int64_t r = 0; r < rows; ++r)
      if (grouped_layout[r] == e) mine.push_back(r);
    const int64_t n = static_cast<int64_t>(mine.size());
    if (n == 0) continue;

    // The expert's rows, gathered with row-major 1x128 scales.
    std::vector<uint8_t> a(n * H);
    std::vector<float> sa(n * KB), ws(n, 1.0f);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = mine[i];
      for (int64_t c = 0; c < H; ++c) a[i * H + c] = x.codes[r * x.ld + c];
      for (int64_t b = 0; b < KB; ++b) sa[i * KB + b] = x.scale(r, b * 128);
      if (row_scale != nullptr) ws[i] = row_scale[r];
    }
    const Fp8MatrixRef ar = fp8_matrix_ref(a.data(), sa.data(), n, H, ScaleGranularity::k1x128);

    // 1. gate_up = x w13^T, BF16.
    std::vector<bf16> gate_up(n * 2 * I);
    gemm_fp8_reference_bf16(ar, weights.w13_ref(e), gate_up.data(), 2 * I, model, threads);

    // 2. h = swiglu(gate_up) (* row_scale), quantised 1x128 (row-major scales).
    const std::vector<int32_t> layout(n, static_cast<int32_t>(e));
    std::vector<uint8_t> h(n * I);
    std::vector<float> sh(n * IB);
    kernels::swiglu_quantize_1x128_reference(
        gate_up.data(), 2 * I, n, I, row_scale != nullptr ? ws.data() : nullptr, layout.data(),
        nullptr, 0, pow2_scales, h.data(), I, sh.data(), kernels::ScaleLayout::kRowMajor);

    // 3. y = h w2^T, BF16, scattered back to the rows.
    Fp8MatrixRef hr = ar;
    hr.codes = h.data();
    hr.cols = I;
    hr.ld = I;
    hr.scales = sh.data();
    hr.scale_row_stride = IB;
    std::vector<bf16> out(n * H);
    gemm_fp8_reference_bf16(hr, weights.w2_ref(e), out.data(), H, model, threads);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < H; ++c) y[mine[i] * H + c] = out[i * H + c];
  }
}

// ---- transposed weights ----

namespace {

// codes [G][n][k] -> [G][k][n], 128x128 block scales [G][n/128][k/128] -> [G][k/128][n/128].
void transpose_blocks(const std::vector<uint8_t>& w, const std::vector<float>& s, int64_t groups,
                      int64_t n, int64_t k, std::vector<uint8_t>& wt, std::vector<float>& st) {
  wt.resize(w.size());
  st.resize(s.size());
  const int64_t nb = n / 128, kb = k / 128;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* a = w.data() + g * n * k;
    uint8_t* b = wt.data() + g * n * k;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < k; ++j) b[j * n + i] = a[i * k + j];
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t j = 0; j < kb; ++j) st[g * nb * kb + j * nb + i] = s[g * nb * kb + i * kb + j];
  }
}

// A [rows, cols] view of codes with leading dimension ld and 1x128 scales at
// scales[r * row_stride + (c / 128) * col_stride].
Fp8MatrixRef act_ref(const uint8_t* codes, int64_t rows, int64_t cols, int64_t ld,
                     const float* scales, int64_t row_stride, int64_t col_stride) {
  Fp8MatrixRef r;
  r.codes = codes;
  r.rows = rows;
  r.cols = cols;
  r.ld = ld;
  r.scales = scales;
  r.granularity = ScaleGranularity::k1x128;
  r.scale_row_stride = row_stride;
  r.scale_col_stride = col_stride;
  return r;
}

}  // namespace

Fp8MatrixRef ExpertWeightsTransposedHost::w13t_ref(int64_t expert) const {
  FM_CHECK_ARG(expert >= 0 && expert < groups, "ExpertWeightsTransposedHost: expert ", expert,
               " of ", groups);
  const int64_t n = 2 * inter;
  return fp8_matrix_ref(w13t.data() + expert * n * hidden,
                        s13t.data() + expert * (n / 128) * (hidden / 128), hidden, n,
                        ScaleGranularity::k128x128);
}

Fp8MatrixRef ExpertWeightsTransposedHost::w2t_ref(int64_t expert) const {
  FM_CHECK_ARG(expert >= 0 && expert < groups, "ExpertWeightsTransposedHost: expert ", expert,
               " of ", groups);
  return fp8_matrix_ref(w2t.data() + expert * hidden * inter,
                        s2t.data() + expert * (hidden / 128) * (inter / 128), inter, hidden,
                        ScaleGranularity::k128x128);
}

ExpertWeightsTransposedHost transpose_expert_weights(const ExpertWeightsHost& w) {
  const int64_t G = w.groups, H = w.hidden, I = w.inter;
  check_dims(G, H, I, "transpose_expert_weights");
  FM_CHECK_ARG(w.w13.size() == static_cast<size_t>(G * 2 * I * H) &&
                   w.s13.size() == static_cast<size_t>(G * (2 * I / 128) * (H / 128)) &&
                   w.w2.size() == static_cast<size_t>(G * H * I) &&
                   w.s2.size() == static_cast<size_t>(G * (H / 128) * (I / 128)),
               "transpose_expert_weights: weight arrays do not match groups=", G, " hidden=", H,
               " inter=", I);
  ExpertWeightsTransposedHost t;
  t.groups = G;
  t.hidden = H;
  t.inter = I;
  transpose_blocks(w.w13, w.s13, G, 2 * I, H, t.w13t, t.s13t);
  transpose_blocks(w.w2, w.s2, G, H, I, t.w2t, t.s2t);
  return t;
}

// ---- backward ----

void expert_ffn_backward_reference(const Fp8MatrixRef& x, const int32_t* grouped_layout,
                                   const std::vector<int64_t>& expert_rows,
                                   const ExpertWeightsHost& weights, const bf16* gate_up,
                                   const bf16* dy, const float* row_scale, bool pow2_scales,
                                   bf16* dx, float* dw13, float* dw2, float* d_row_scale,
                                   int threads) {
  constexpr const char* kName = "expert_ffn_backward_reference";
  const int64_t G = weights.groups, H = weights.hidden, I = weights.inter, R = x.rows;
  check_dims(G, H, I, kName);
  const ExpertWeightsTransposedHost wt = transpose_expert_weights(weights);
  FM_CHECK_ARG(x.cols == H, kName, ": x has ", x.cols, " columns, hidden is ", H);
  FM_CHECK_ARG(x.granularity == ScaleGranularity::k1x128, kName, ": x must be 1x128-scaled");
  FM_CHECK_ARG(static_cast<int64_t>(expert_rows.size()) == G, kName, ": ", expert_rows.size(),
               " expert row counts for ", G, " experts");
  std::vector<int64_t> start(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    FM_CHECK_ARG(expert_rows[g] >= 0 && expert_rows[g] % 128 == 0, kName, ": expert ", g, " has ",
                 expert_rows[g], " rows, not a multiple of 128");
    start[g + 1] = start[g] + expert_rows[g];
  }
  FM_CHECK_ARG(start[G] == R, kName, ": expert rows sum to ", start[G], ", x has ", R, " rows");
  if (R == 0) return;
  FM_CHECK_ARG(grouped_layout != nullptr && gate_up != nullptr && dy != nullptr && dx != nullptr &&
                   dw13 != nullptr && dw2 != nullptr,
               kName, ": null grouped_layout, gate_up, dy, dx, dw13 or dw2");
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = start[g]; r < start[g + 1]; ++r)
      FM_CHECK_ARG(grouped_layout[r] < 0 || grouped_layout[r] == g, kName, ": row ", r,
                   " names expert ", grouped_layout[r], " inside expert ", g, "'s rows");
  auto real = [&](int64_t r) { return grouped_layout[r] >= 0; };
  QuantizeOptions qo;
  qo.pow2_scales = pow2_scales;
  const int64_t RB = R / 128, I2 = 2 * I;

  // Quantise m [R, cols] (FP32) 1x128 along cols (row-major scales [R][cols/128]) and its
  // transpose along rows ([cols, R], row-major scales [cols][R/128]).
  auto quantize_both = [&](const std::vector<float>& m, int64_t cols, std::vector<uint8_t>& q,
                           std::vector<float>& qs, std::vector<uint8_t>& qt,
                           std::vector<float>& qts) {
    q.resize(R * cols);
    qs.resize(R * (cols / 128));
    quantize_into(m.data(), R, cols, cols, ScaleGranularity::k1x128, qo, q.data(), cols, qs.data());
    std::vector<float> t(R * cols);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < cols; ++c) t[c * R + r] = m[r * cols + c];
    qt.resize(R * cols);
    qts.resize(cols * RB);
    quantize_into(t.data(), cols, R, R, ScaleGranularity::k1x128, qo, qt.data(), R, qts.data());
  };
  // Per expert: out[r] (BF16, real rows) = a[r] * b(e)^T.
  auto dgrad = [&](const std::vector<uint8_t>& a, const std::vector<float>& as, int64_t k,
                   int64_t n, bool w2, bf16* out) {
    for (int64_t e = 0; e < G; ++e) {
      std::vector<int64_t> mine;
      for (int64_t r = start[e]; r < start[e + 1]; ++r)
        if (real(r)) mine.push_back(r);
      const int64_t m = static_cast<int64_t>(mine.size());
      if (m == 0) continue;
      std::vector<uint8_t> ag(m * k);
      std::vector<float> sg(m * (k / 128));
      for (int64_t i = 0; i < m; ++i) {
        std::copy_n(a.data() + mine[i] * k, k, ag.data() + i * k);
        std::copy_n(as.data() + mine[i] * (k / 128), k / 128, sg.data() + i * (k / 128));
      }
      std::vector<bf16> o(m * n);
      gemm_fp8_reference_bf16(act_ref(ag.data(), m, k, k, sg.data(), k / 128, 1),
                              w2 ? wt.w2t_ref(e) : wt.w13t_ref(e), o.data(), n, {}, threads);
      for (int64_t i = 0; i < m; ++i) std::copy_n(o.data() + i * n, n, out + mine[i] * n);
    }
  };

  // 1. dy, padding rows 0.
  std::vector<float> dyz(R * H, 0.0f);
  for (int64_t r = 0; r < R; ++r)
    if (real(r))
      for (int64_t c = 0; c < H; ++c) dyz[r * H + c] = to_float(dy[r * H + c]);
  std::vector<uint8_t> dy8, dyt8;
  std::vector<float> dy8s, dyt8s;
  quantize_both(dyz, H, dy8, dy8s, dyt8, dyt8s);

  // 2. dh (padding rows 0: never read).
  std::vector<bf16> dh(R * I, bf16{0});
  dgrad(dy8, dy8s, H, I, true, dh.data());

  // 3. d_gate_up.
  std::vector<bf16> dgu(R * I2);
  kernels::swiglu_backward_reference(gate_up, I2, dh.data(), I, R, I, row_scale, grouped_layout,
                                     nullptr, 0, dgu.data(), I2, d_row_scale);

  // 4., 5. dgu8, dguT8, dx.
  std::vector<float> dguf(R * I2);
  for (int64_t i = 0; i < R * I2; ++i) dguf[i] = to_float(dgu[i]);
  std::vector<uint8_t> dgu8, dgut8;
  std::vector<float> dgu8s, dgut8s;
  quantize_both(dguf, I2, dgu8, dgu8s, dgut8, dgut8s);
  dgrad(dgu8, dgu8s, I2, H, false, dx);

  // 6. h recomputed, transposed; dW2.
  std::vector<uint8_t> h(R * I), ht(I * R);
  std::vector<float> hs(R * (I / 128)), hts(RB * padded_rows(I));
  kernels::swiglu_quantize_1x128_reference(gate_up, I2, R, I, row_scale, grouped_layout, nullptr, 0,
                                           pow2_scales, h.data(), I, hs.data(),
                                           kernels::ScaleLayout::kRowMajor);
  kernels::requantize_1x128_transpose_reference(h.data(), I, hs.data(),
                                                kernels::ScaleLayout::kRowMajor, R, I,
                                                grouped_layout, pow2_scales, ht.data(), hts.data());
  // 7. x transposed (row-major scales gathered first: any input strides).
  std::vector<uint8_t> xc(R * H), xt(H * R);
  std::vector<float> xs(R * (H / 128)), xts(RB * padded_rows(H));
  for (int64_t r = 0; r < R; ++r) {
    std::copy_n(x.codes + r * x.ld, H, xc.data() + r * H);
    for (int64_t b = 0; b < H / 128; ++b) xs[r * (H / 128) + b] = x.scale(r, b * 128);
  }
  kernels::requantize_1x128_transpose_reference(xc.data(), H, xs.data(),
                                                kernels::ScaleLayout::kRowMajor, R, H,
                                                grouped_layout, pow2_scales, xt.data(), xts.data());
  for (int64_t e = 0; e < G; ++e) {
    const int64_t k = expert_rows[e], s0 = start[e];
    if (k == 0) continue;
    // A: [M, rows of e] with row-major scales [M][R/128]; B: [N, rows of e], M-major [R/128][pN].
    gemm_fp8_reference(act_ref(dyt8.data() + s0, H, k, R, dyt8s.data() + s0 / 128, RB, 1),
                       act_ref(ht.data() + s0, I, k, R, hts.data() + (s0 / 128) * padded_rows(I), 1,
                               padded_rows(I)),
                       dw2 + e * H * I, I, {}, true, threads);
    gemm_fp8_reference(act_ref(dgut8.data() + s0, I2, k, R, dgut8s.data() + s0 / 128, RB, 1),
                       act_ref(xt.data() + s0, H, k, R, xts.data() + (s0 / 128) * padded_rows(H), 1,
                               padded_rows(H)),
                       dw13 + e * I2 * H, H, {}, true, threads);
  }
}

}  // namespace fp8moe
