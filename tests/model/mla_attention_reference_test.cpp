// kernels' MLA attention references (src/kernels/mla_attention_reference.cpp) against the model:
// the forward against model.cpp's attend_row on the same (BF16-valued) inputs, the backward
// against central differences of a double-precision forward written here.
// Run: test_model --gtest_filter='MlaAttentionReference*'
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/kernels/mla_attention.h"
#include "fp8moe/model/attend_row.h"

namespace fp8moe {
namespace {

using kernels::MlaAttentionShape;
constexpr int64_t kDn = 128, kDr = 64, kDv = 128, kDq = 192, kDkv = 256;
constexpr float kScale = 0.1352f;  // V3's: 192^-0.5 times YaRN's mscale^2

std::vector<bf16> random_bf16(int64_t n, uint64_t seed, float std_dev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std_dev);
  std::vector<bf16> x(static_cast<size_t>(n));
  for (auto& v : x) v = to_bf16(normal(rng));
  return x;
}
std::vector<float> widen(const std::vector<bf16>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = to_float(x[i]);
  return out;
}

// The reference runs attend_row's arithmetic in attend_row's order, so the FP32 results agree up
// to the compilers' choices (contraction): the BF16 outputs are equal or one BF16 ulp apart
// (a rounding boundary); lse is checked against a double log-sum-exp to 1e-5 relative.
TEST(MlaAttentionReference, ForwardMatchesAttendRow) {
  const MlaAttentionShape shape{2, 37, 3};
  const int64_t T = shape.tokens(), H = shape.heads, S = shape.seq;
  const auto q16 = random_bf16(T * H * kDq, 1, 1.0f), kv16 = random_bf16(T * H * kDkv, 2, 1.0f),
             kpe16 = random_bf16(T * kDr, 3, 1.0f);
  std::vector<bf16> out(static_cast<size_t>(T * H * kDv));
  std::vector<float> lse(static_cast<size_t>(H * T));
  kernels::mla_attention_forward_reference(q16.data(), kv16.data(), kpe16.data(), shape, kScale,
                                           out.data(), lse.data());
  const auto q = widen(q16), kv = widen(kv16), kpe = widen(kpe16);
  std::vector<float> scratch(static_cast<size_t>(S)), probs(static_cast<size_t>(S)),
      row(static_cast<size_t>(kDv));
  int64_t equal = 0, one_ulp = 0;
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = b * S + s;
        std::fill(row.begin(), row.end(), 0.0f);
        attend_row(q.data() + (t * H + h) * kDq, kv.data() + (b * S * H + h) * kDkv, H * kDkv,
                   kpe.data() + b * S * kDr, s + 1, kDn, kDr, kDv, kScale, scratch.data(),
                   probs.data(), row.data());
        for (int64_t i = 0; i < kDv; ++i) {
          const uint16_t want = to_bf16(row[i]).bits, got = out[(t * H + h) * kDv + i].bits;
          const int diff = std::abs(static_cast<int>(want) - static_cast<int>(got));
          ASSERT_LE(diff, 1) << "b=" << b << " h=" << h << " s=" << s << " i=" << i;
          (diff == 0 ? equal : one_ulp)++;
        }
        double mx = -INFINITY;
        std::vector<double> sc(static_cast<size_t>(s + 1));
        for (int64_t s2 = 0; s2 <= s; ++s2) {
          const int64_t t2 = b * S + s2;
          double dot = 0;
          for (int64_t i = 0; i < kDn; ++i)
            dot += static_cast<double>(q[(t * H + h) * kDq + i]) * kv[(t2 * H + h) * kDkv + i];
          for (int64_t i = 0; i < kDr; ++i)
            dot += static_cast<double>(q[(t * H + h) * kDq + kDn + i]) * kpe[t2 * kDr + i];
          sc[s2] = dot * kScale;
          mx = std::max(mx, sc[s2]);
        }
        double sum = 0;
        for (double v : sc) sum += std::exp(v - mx);
        const double want_lse = mx + std::log(sum);
        EXPECT_NEAR(lse[h * T + t], want_lse, 1e-5 * (1 + std::abs(want_lse)))
            << "b=" << b << " h=" << h << " s=" << s;
      }
  std::printf("reference vs attend_row: %lld equal, %lld one BF16 ulp apart\n",
              static_cast<long long>(equal), static_cast<long long>(one_ulp));
  EXPECT_LE(one_ulp, (equal + one_ulp) / 100);
}

double val(bf16 v) {
  return to_float(v);
}
double val(float v) {
  return v;
}

// loss = sum(dout * out) in double; out of the exact forward.
double loss(const std::vector<double>& q, const std::vector<double>& kv,
            const std::vector<double>& kpe, const std::vector<float>& dout, MlaAttentionShape shape,
            std::vector<double>* out_rows = nullptr) {
  const int64_t T = shape.tokens(), H = shape.heads, S = shape.seq;
  double total = 0;
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = b * S + s;
        std::vector<double> sc(static_cast<size_t>(s + 1));
        double mx = -INFINITY;
        for (int64_t s2 = 0; s2 <= s; ++s2) {
          const int64_t t2 = b * S + s2;
          double dot = 0;
          for (int64_t i = 0; i < kDn; ++i)
            dot += q[(t * H + h) * kDq + i] * kv[(t2 * H + h) * kDkv + i];
          for (int64_t i = 0; i < kDr; ++i)
            dot += q[(t * H + h) * kDq + kDn + i] * kpe[t2 * kDr + i];
          sc[s2] = dot * kScale;
          mx = std::max(mx, sc[s2]);
        }
        double sum = 0;
        for (auto& v : sc) sum += (v = std::exp(v - mx));
        for (int64_t i = 0; i < kDv; ++i) {
          double o = 0;
          for (int64_t s2 = 0; s2 <= s; ++s2)
            o += sc[s2] / sum * kv[((b * S + s2) * H + h) * kDkv + kDn + i];
          if (out_rows) (*out_rows)[(t * H + h) * kDv + i] = o;
          total += o * dout[(t * H + h) * kDv + i];
        }
      }
  (void)T;
  return total;
}

// Central differences (step 1e-3 on inputs of magnitude ~1; the loss is smooth, so the
// truncation error is ~1e-6) against the reference's gradients. The reference takes D from the
// BF16-rounded out as the GPU does, and rounds dq / dkv to BF16: both cost ~2^-8 relative, so
// the bound is 1e-2 of the gradient tensor's largest magnitude, per checked element.
TEST(MlaAttentionReference, BackwardMatchesFiniteDifferences) {
  const MlaAttentionShape shape{2, 9, 2};
  const int64_t T = shape.tokens(), H = shape.heads;
  const auto q16 = random_bf16(T * H * kDq, 4, 1.0f), kv16 = random_bf16(T * H * kDkv, 5, 1.0f),
             kpe16 = random_bf16(T * kDr, 6, 1.0f), dout16 = random_bf16(T * H * kDv, 7, 1.0f);
  std::vector<double> q(q16.size()), kv(kv16.size()), kpe(kpe16.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = to_float(q16[i]);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = to_float(kv16[i]);
  for (size_t i = 0; i < kpe.size(); ++i) kpe[i] = to_float(kpe16[i]);
  const auto dout = widen(dout16);
  std::vector<double> out_exact(static_cast<size_t>(T * H * kDv));
  loss(q, kv, kpe, dout, shape, &out_exact);
  std::vector<bf16> out16(out_exact.size());
  for (size_t i = 0; i < out16.size(); ++i) out16[i] = to_bf16(static_cast<float>(out_exact[i]));
  std::vector<bf16> out_ref(out16.size());
  std::vector<float> lse(static_cast<size_t>(H * T));
  kernels::mla_attention_forward_reference(q16.data(), kv16.data(), kpe16.data(), shape, kScale,
                                           out_ref.data(), lse.data());
  std::vector<bf16> dq(q.size()), dkv(kv.size());
  std::vector<float> dkpe(kpe.size());
  kernels::mla_attention_backward_reference(q16.data(), kv16.data(), kpe16.data(), out16.data(),
                                            dout16.data(), lse.data(), shape, kScale, dq.data(),
                                            dkv.data(), dkpe.data());
  const auto check = [&](std::vector<double>& x, const auto& grad, const char* name) {
    double gmax = 0;
    for (const auto& g : grad) gmax = std::max(gmax, std::abs(val(g)));
    ASSERT_GT(gmax, 0.0) << name;
    std::mt19937_64 rng(99);
    for (int k = 0; k < 40; ++k) {
      const size_t i = rng() % x.size();
      const double x0 = x[i], h = 1e-3;
      x[i] = x0 + h;
      const double up = loss(q, kv, kpe, dout, shape);
      x[i] = x0 - h;
      const double down = loss(q, kv, kpe, dout, shape);
      x[i] = x0;
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(val(grad[i]), fd, 1e-2 * gmax) << name << "[" << i << "]";
    }
  };
  check(q, dq, "dq");
  check(kv, dkv, "dkv");
  check(kpe, dkpe, "dk_pe");
}

TEST(MlaAttentionReference, BadShapesThrow) {
  std::vector<bf16> x(kDkv);
  std::vector<float> l(1);
  EXPECT_THROW(kernels::mla_attention_forward_reference(x.data(), x.data(), x.data(), {1, 0, 1},
                                                        kScale, x.data(), l.data()),
               Error);
  EXPECT_THROW(kernels::mla_attention_forward_reference(x.data(), x.data(), x.data(), {1, 1, 0},
                                                        kScale, x.data(), l.data()),
               Error);
}

}  // namespace
}  // namespace fp8moe
