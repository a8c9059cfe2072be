// CPU reference of MLA's decoding attention in latent form (kernels/mla_decode.h): plain loops,
// FP32, one online pass per row in key order. Tested by tests/kernels/mla_decode_test.cpp
// (`test_kernels --gtest_filter='MlaDecodeReference*'`); the GPU tests compare against it.
#include <cmath>
#include <limits>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/kernels/mla_decode.h"

namespace fp8moe::kernels {

void mla_decode_check_shape(const char* who, const MlaDecodeShape& s) {
  FM_CHECK_ARG(s.batch >= 0, who, ": batch=", s.batch, " must not be negative");
  FM_CHECK_ARG(s.queries > 0, who, ": queries=", s.queries, " must be positive");
  FM_CHECK_ARG(s.heads > 0, who, ": heads=", s.heads, " must be positive");
  FM_CHECK_ARG(s.latent_dim > 0 && s.rope_dim >= 0, who, ": latent_dim=", s.latent_dim,
               " must be positive and rope_dim=", s.rope_dim, " not negative");
  FM_CHECK_ARG(s.page_tokens > 0, who, ": page_tokens=", s.page_tokens, " must be positive");
  FM_CHECK_ARG(s.max_pages > 0, who, ": max_pages=", s.max_pages, " must be positive");
  FM_CHECK_ARG(s.max_pages <= std::numeric_limits<int32_t>::max() / s.page_tokens, who,
               ": max_pages x page_tokens = ", s.max_pages, " x ", s.page_tokens,
               " overflows int32 positions");
  FM_CHECK_ARG(std::isfinite(s.softmax_scale) && s.softmax_scale > 0, who,
               ": softmax_scale=", s.softmax_scale, " must be positive and finite");
}

void mla_decode_reference(const MlaDecodeShape& s, const float* q, const float* cache,
                          const int32_t* page_table, const int32_t* seq_lens, float* out,
                          float* lse) {
  mla_decode_check_shape("mla_decode_reference", s);
  const int64_t D = s.key_dim(), L = s.latent_dim, rows = s.rows();
  const int64_t capacity = s.max_pages * s.page_tokens;
  std::vector<float> scores, acc(static_cast<size_t>(L));
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t len = seq_lens[b];
    FM_CHECK_ARG(len >= 0 && len <= capacity, "mla_decode_reference: seq_lens[", b, "]=", len,
                 " outside [0, max_pages x page_tokens = ", capacity, "]");
    const auto key_row = [&](int64_t t) {
      const int32_t page = page_table[b * s.max_pages + t / s.page_tokens];
      FM_CHECK_ARG(page >= 0, "mla_decode_reference: page_table[", b, ", ", t / s.page_tokens,
                   "]=", page, " is not a page");
      return cache + (static_cast<int64_t>(page) * s.page_tokens + t % s.page_tokens) * D;
    };
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r / s.heads;
      const int64_t visible = std::max<int64_t>(0, len - s.queries + i + 1);
      const float* qr = q + (b * rows + r) * D;
      float* o = out + (b * rows + r) * L;
      scores.assign(static_cast<size_t>(visible), 0.0f);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < visible; ++t) {
        const float* k = key_row(t);
        float dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * k[d];
        scores[t] = dot * s.softmax_scale;
        mx = std::max(mx, scores[t]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      double sum = 0;
      for (int64_t t = 0; t < visible; ++t) {
        const float p = std::exp(scores[t] - mx);
        sum += p;
        const float* k = key_row(t);
        for (int64_t d = 0; d < L; ++d) acc[d] += p * k[d];
      }
      for (int64_t d = 0; d < L; ++d) o[d] = visible > 0 ? static_cast<float>(acc[d] / sum) : 0.0f;
      lse[b * rows + r] = visible > 0 ? mx + static_cast<float>(std::log(sum))
                                      : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace fp8moe::kernels
