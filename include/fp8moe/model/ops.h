// CPU building blocks of the model: a blocked, multi-threaded FP32 GEMM, a deterministic
// parallel-for, and the small elementwise layers (RMSNorm, SwiGLU, RoPE, cross-entropy) with
// their backward passes. Results never depend on the thread count: every output element is
// computed by one thread in a fixed order.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "fp8moe/model/config.h"

namespace fp8moe {

// Threads used by the model's CPU kernels (default: the machine's hardware threads).
int model_threads();
void set_model_threads(int threads);

// Calls fn(begin, end) over [0, n) cut into at most `threads` contiguous chunks, one per thread;
// the calling thread runs the first. Small n (< min_per_thread per chunk) stays on one thread.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                  int threads = model_threads(), int64_t min_per_thread = 1);

// C[M,N] (+)= op(A)[M,K] * op(B)[K,N], FP32 accumulation in k order.
//   op(A) = A ([M,K], leading dim lda) or, with trans_a, A^T (A stored [K,M]).
//   op(B) = B ([K,N], leading dim ldb) or, with trans_b, B^T (B stored [N,K]).
void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, bool trans_a,
              const float* b, int64_t ldb, bool trans_b, float* c, int64_t ldc, bool accumulate,
              int threads = model_threads());

// Transpose rows x cols (row-major) into cols x rows.
void transpose(const float* x, int64_t rows, int64_t cols, float* out);

// RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w. rstd [rows] is kept for
// backward. Backward adds into dw and writes dx.
void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t dim, double eps,
                     float* y, float* rstd);
void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy,
                      int64_t rows, int64_t dim, float* dx, float* dw);

// SwiGLU: a = silu(g) * u. Backward from da gives dg, du.
void swiglu_forward(const float* g, const float* u, int64_t n, float* a);
void swiglu_backward(const float* g, const float* u, const float* da, int64_t n, float* dg,
                     float* du);

// Rotary embedding on pairs (x[2i], x[2i+1]) with angle pos * theta^(-2i/dim). `inverse`
// rotates by the negative angle (the backward of the forward rotation).
struct RopeTable {
  int64_t dim = 0, positions = 0;
  std::vector<float> cos, sin;  // [positions, dim/2]
};
// RoPE tables. With rope_scaling type "yarn" (DeepSeek-V3's long-context setting) the inverse
// frequencies and the attention scale follow YaRN as the V3 reference implementation applies it:
//   extra_i = theta^(-2i/dim), inter_i = extra_i / factor; the dimensions between the
//   correction range [low, high] of beta_fast / beta_slow rotations over
//   original_max_position_embeddings blend linearly from extra (below low) to inter (above high),
//   where correction(r) = dim * ln(orig / (2 pi r)) / (2 ln theta), low =
//   floor(correction(beta_fast))
//   >= 0, high = ceil(correction(beta_slow)) <= dim - 1;
//   cos and sin are multiplied by yarn_mscale(factor, mscale) / yarn_mscale(factor,
//   mscale_all_dim); the softmax scale 1/sqrt(head_dim) is multiplied by yarn_mscale(factor,
//   mscale_all_dim)^2 when mscale_all_dim is non-zero.
double yarn_mscale(double factor,
                   double mscale);  // 0.1 * mscale * ln(factor) + 1 (1 if factor <= 1)
std::vector<double> rope_inverse_frequencies(int64_t dim, double theta, const RopeScaling& scaling);
double attention_softmax_scale(int64_t head_dim, const RopeScaling& scaling);
RopeTable make_rope_table(int64_t dim, int64_t positions, double theta,
                          const RopeScaling& scaling = {});
void rope_apply(const RopeTable& table, float* x, int64_t pos, bool inverse);

// Mean cross-entropy over rows of logits [rows, vocab] with integer targets; returns the loss
// (double-accumulated) and, when dlogits is given, writes scale * d(loss)/d(logits).
double cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                     float* dlogits, float scale);

}  // namespace fp8moe
