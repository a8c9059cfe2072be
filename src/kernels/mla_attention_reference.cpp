// CPU references of MLA's causal attention core and its backward (kernels/mla_attention.h):
// plain loops, FP32 on the BF16 inputs in model.cpp attend_row's order (forward), double sums
// (backward). Tested against attend_row by tests/model/mla_attention_reference_test.cpp
// (`test_model --gtest_filter='MlaAttentionReference*'`); the GPU tests compare against these.
#include <cmath>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_attention.h"

namespace fp8moe::kernels {

void mla_attention_check_shape(const char* who, MlaAttentionShape shape) {
  FM_CHECK_ARG(shape.batch > 0, who, ": batch=", shape.batch, " must be positive");
  FM_CHECK_ARG(shape.seq > 0, who, ": seq=", shape.seq, " must be positive");
  FM_CHECK_ARG(shape.heads > 0, who, ": heads=", shape.heads, " must be positive");
  FM_CHECK_ARG(shape.batch <= (int64_t{1} << 31) / shape.seq &&
                   shape.tokens() <= ((int64_t{1} << 31) - 1) / shape.heads,
               who, ": tokens x heads = ", shape.batch, " x ", shape.seq, " x ", shape.heads,
               " must stay below 2^31");
}

namespace {

constexpr int64_t kDn = kMlaNopeDim, kDr = kMlaRopeDim, kDv = kMlaValueDim;
constexpr int64_t kDq = kMlaQDim, kDkv = kMlaKvDim;

std::vector<float> widen(const bf16* x, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(x[i]);
  return out;
}

// score(t, t2) as attend_row forms it: FP32 nope dot, then the rope part, times scale.
float score(const float* qv, const float* kn, const float* kp, float scale) {
  float dot = 0;
  for (int64_t i = 0; i < kDn; ++i) dot += qv[i] * kn[i];
  for (int64_t i = 0; i < kDr; ++i) dot += qv[kDn + i] * kp[i];
  return dot * scale;
}

}  // namespace

void mla_attention_forward_reference(const bf16* q16, const bf16* kv16, const bf16* kpe16,
                                     MlaAttentionShape shape, float scale, bf16* out, float* lse) {
  mla_attention_check_shape("mla_attention_forward_reference", shape);
  const int64_t T = shape.tokens(), H = shape.heads, S = shape.seq;
  const std::vector<float> q = widen(q16, T * H * kDq), kv = widen(kv16, T * H * kDkv),
                           kpe = widen(kpe16, T * kDr);
  std::vector<float> sc(static_cast<size_t>(S)), acc(static_cast<size_t>(kDv));
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = b * S + s;
        const float* qv = q.data() + (t * H + h) * kDq;
        float mx = -INFINITY;
        for (int64_t s2 = 0; s2 <= s; ++s2) {
          const int64_t t2 = b * S + s2;
          sc[s2] = score(qv, kv.data() + (t2 * H + h) * kDkv, kpe.data() + t2 * kDr, scale);
          mx = std::max(mx, sc[s2]);
        }
        double sum = 0;
        for (int64_t s2 = 0; s2 <= s; ++s2) {
          sc[s2] = std::exp(sc[s2] - mx);
          sum += sc[s2];
        }
        const float inv = static_cast<float>(1.0 / sum);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t s2 = 0; s2 <= s; ++s2) {
          const float p = sc[s2] * inv;
          const float* vv = kv.data() + ((b * S + s2) * H + h) * kDkv + kDn;
          for (int64_t i = 0; i < kDv; ++i) acc[i] += p * vv[i];
        }
        for (int64_t i = 0; i < kDv; ++i) out[(t * H + h) * kDv + i] = to_bf16(acc[i]);
        lse[h * T + t] = mx + static_cast<float>(std::log(sum));
      }
}

void mla_attention_backward_reference(const bf16* q16, const bf16* kv16, const bf16* kpe16,
                                      const bf16* out16, const bf16* dout16, const float* lse,
                                      MlaAttentionShape shape, float scale, bf16* dq, bf16* dkv,
                                      float* dk_pe) {
  mla_attention_check_shape("mla_attention_backward_reference", shape);
  const int64_t T = shape.tokens(), H = shape.heads, S = shape.seq;
  const std::vector<float> q = widen(q16, T * H * kDq), kv = widen(kv16, T * H * kDkv),
                           kpe = widen(kpe16, T * kDr), o = widen(out16, T * H * kDv),
                           dout = widen(dout16, T * H * kDv);
  std::vector<double> gq(static_cast<size_t>(T * H * kDq), 0.0),
      gkv(static_cast<size_t>(T * H * kDkv), 0.0), gkpe(static_cast<size_t>(T * kDr), 0.0);
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = b * S + s;
        const float* qv = q.data() + (t * H + h) * kDq;
        const float* dov = dout.data() + (t * H + h) * kDv;
        const float* ov = o.data() + (t * H + h) * kDv;
        double dsum = 0;  // D = rowsum(dout * out), of the BF16 out the forward wrote
        for (int64_t i = 0; i < kDv; ++i) dsum += static_cast<double>(dov[i]) * ov[i];
        double* gqv = gq.data() + (t * H + h) * kDq;
        for (int64_t s2 = 0; s2 <= s; ++s2) {
          const int64_t t2 = b * S + s2;
          const float* kn = kv.data() + (t2 * H + h) * kDkv;
          const float* kp = kpe.data() + t2 * kDr;
          const double p = std::exp(static_cast<double>(score(qv, kn, kp, scale)) - lse[h * T + t]);
          double dp = 0;
          for (int64_t i = 0; i < kDv; ++i) dp += static_cast<double>(dov[i]) * kn[kDn + i];
          const double ds = p * (dp - dsum) * scale;
          double* gkn = gkv.data() + (t2 * H + h) * kDkv;
          for (int64_t i = 0; i < kDv; ++i) gkn[kDn + i] += p * dov[i];
          for (int64_t i = 0; i < kDn; ++i) {
            gqv[i] += ds * kn[i];
            gkn[i] += ds * qv[i];
          }
          for (int64_t i = 0; i < kDr; ++i) {
            gqv[kDn + i] += ds * kp[i];
            gkpe[t2 * kDr + i] += ds * qv[kDn + i];
          }
        }
      }
  for (size_t i = 0; i < gq.size(); ++i) dq[i] = to_bf16(static_cast<float>(gq[i]));
  for (size_t i = 0; i < gkv.size(); ++i) dkv[i] = to_bf16(static_cast<float>(gkv[i]));
  for (size_t i = 0; i < gkpe.size(); ++i) dk_pe[i] = static_cast<float>(gkpe[i]);
}

}  // namespace fp8moe::kernels
