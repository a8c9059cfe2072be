// The routed experts' FP8 FFN on the CPU (moe/expert_ffn_reference.h): weight quantisation into
// the grouped GEMMs' layout and the per-expert reference.
#include "fp8moe/moe/expert_ffn_reference.h"

#include <string>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
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

Fp8MatrixRef block_ref(const uint8_t* codes, const float* scales, int64_t rows, int64_t cols) {
  Fp8MatrixRef r;
  r.codes = codes;
  r.rows = rows;
  r.cols = cols;
  r.ld = cols;
  r.scales = scales;
  r.granularity = ScaleGranularity::k128x128;
  r.scale_row_stride = cols / 128;
  r.scale_col_stride = 1;
  return r;
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
  return block_ref(w13.data() + expert * n * hidden,
                   s13.data() + expert * (n / 128) * (hidden / 128), n, hidden);
}

Fp8MatrixRef ExpertWeightsHost::w2_ref(int64_t expert) const {
  FM_CHECK_ARG(expert >= 0 && expert < groups, "ExpertWeightsHost: expert ", expert, " of ",
               groups);
  return block_ref(w2.data() + expert * hidden * inter,
                   s2.data() + expert * (hidden / 128) * (inter / 128), hidden, inter);
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
    Fp8MatrixRef ar;
    ar.codes = a.data();
    ar.rows = n;
    ar.cols = H;
    ar.ld = H;
    ar.scales = sa.data();
    ar.granularity = ScaleGranularity::k1x128;
    ar.scale_row_stride = KB;
    ar.scale_col_stride = 1;

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

}  // namespace fp8moe
