#include "fp8moe/model/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>

#include "fp8moe/core/chunk_pool.h"
#include "fp8moe/core/error.h"

// AVX2 and baseline versions of the GEMM kernel, picked at load time (x86-64 with GCC/Clang).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FM_GEMM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FM_GEMM_CLONES
#endif

namespace fp8moe {

namespace {
std::atomic<int> g_threads{0};
}

int model_threads() {
  int t = g_threads.load();
  if (t <= 0) t = std::max(1u, std::thread::hardware_concurrency());
  return t;
}
void set_model_threads(int threads) {
  g_threads.store(threads);
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int threads,
                  int64_t min_per_thread) {
  if (n <= 0) return;
  int64_t t =
      std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(1, min_per_thread)));
  if (t <= 1) {
    fn(0, n);
    return;
  }
  std::vector<std::exception_ptr> errors(t);
  // Chunk i is [n*i/t, n*(i+1)/t) whichever thread runs it; pooled threads where the pool is free.
  const bool pooled = run_on_chunk_pool(t, [&](int64_t i) {
    try {
      fn(n * i / t, n * (i + 1) / t);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  });
  if (pooled) {
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) {
    workers.emplace_back([&, i] {
      try {
        fn(n * i / t, n * (i + 1) / t);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  try {
    fn(0, n / t);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

void transpose(const float* x, int64_t rows, int64_t cols, float* out) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
          out[c * rows + r] = x[r * cols + c];
}

namespace {
// Rows [4*rb0, 4*rb1) of C. NOTE: compiled for AVX2 and for the baseline; both do the same
// multiplications and additions in the same order (no FMA contraction), so results agree.
FM_GEMM_CLONES void gemm_row_blocks(int64_t rb0, int64_t rb1, int64_t m, int64_t n, int64_t k,
                                    const float* am, int64_t ldam, const float* bk, int64_t ldbk,
                                    float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kBlockN = 256;
  float acc[4][kBlockN];
  for (int64_t j0 = 0; j0 < n; j0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, n - j0);
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int64_t i0 = rb * 4;
      const int64_t rows = std::min<int64_t>(4, m - i0);
      for (int64_t r = 0; r < 4; ++r) std::fill(acc[r], acc[r] + nb, 0.0f);
      if (rows == 4) {
        const float* a0 = am + (i0 + 0) * ldam;
        const float* a1 = am + (i0 + 1) * ldam;
        const float* a2 = am + (i0 + 2) * ldam;
        const float* a3 = am + (i0 + 3) * ldam;
        for (int64_t p = 0; p < k; ++p) {
          const float* brow = bk + p * ldbk + j0;
          const float v0 = a0[p], v1 = a1[p], v2 = a2[p], v3 = a3[p];
          for (int64_t j = 0; j < nb; ++j) {
            const float bv = brow[j];
            acc[0][j] += v0 * bv;
            acc[1][j] += v1 * bv;
            acc[2][j] += v2 * bv;
            acc[3][j] += v3 * bv;
          }
        }
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          const float* ar = am + (i0 + r) * ldam;
          for (int64_t p = 0; p < k; ++p) {
            const float* brow = bk + p * ldbk + j0;
            const float v = ar[p];
            for (int64_t j = 0; j < nb; ++j) acc[r][j] += v * brow[j];
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* crow = c + (i0 + r) * ldc + j0;
        if (accumulate)
          for (int64_t j = 0; j < nb; ++j) crow[j] += acc[r][j];
        else
          std::copy(acc[r], acc[r] + nb, crow);
      }
    }
  }
}

}  // namespace

// NOTE: B is packed once as a row-major [K, N] panel so that the inner loop runs over contiguous
// columns (vectorised by the compiler); four rows of C share each B load. Columns are blocked
// so that a K x kBlockN panel stays in L2.
void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, bool trans_a,
              const float* b, int64_t ldb, bool trans_b, float* c, int64_t ldc, bool accumulate,
              int threads) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  std::vector<float> bp;
  const float* bk = b;  // [K, N] with leading dimension ldbk
  int64_t ldbk = ldb;
  if (trans_b) {
    bp.resize(static_cast<size_t>(k * n));
    parallel_for(
        n,
        [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j)
            for (int64_t p = 0; p < k; ++p) bp[p * n + j] = b[j * ldb + p];
        },
        threads, 64);
    bk = bp.data();
    ldbk = n;
  }
  std::vector<float> ap;
  const float* am = a;  // [M, K] with leading dimension ldam
  int64_t ldam = lda;
  if (trans_a) {
    ap.resize(static_cast<size_t>(m * k));
    for (int64_t p = 0; p < k; ++p)
      for (int64_t i = 0; i < m; ++i) ap[i * k + p] = a[p * lda + i];
    am = ap.data();
    ldam = k;
  }
  const int64_t row_blocks = (m + 3) / 4;
  parallel_for(
      row_blocks,
      [&](int64_t rb0, int64_t rb1) {
        gemm_row_blocks(rb0, rb1, m, n, k, am, ldam, bk, ldbk, c, ldc, accumulate);
      },
      threads, 4);
}

void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t dim, double eps,
                     float* y, float* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float rs = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    rstd[r] = rs;
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = xr[i] * rs * w[i];
  }
}

void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy,
                      int64_t rows, int64_t dim, float* dx, float* dw) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    const float* dyr = dy + r * dim;
    const double rs = rstd[r];
    double dot = 0;  // sum(dy * w * x)
    for (int64_t i = 0; i < dim; ++i) dot += static_cast<double>(dyr[i]) * w[i] * xr[i];
    const double coef = dot * rs * rs * rs / dim;
    for (int64_t i = 0; i < dim; ++i) {
      dx[r * dim + i] = static_cast<float>(rs * dyr[i] * w[i] - coef * xr[i]);
      dw[i] += static_cast<float>(dyr[i] * xr[i] * rs);
    }
  }
}

void swiglu_forward(const float* g, const float* u, int64_t n, float* a) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-g[i]));
    a[i] = g[i] * s * u[i];
  }
}

void swiglu_backward(const float* g, const float* u, const float* da, int64_t n, float* dg,
                     float* du) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-g[i]));
    const float silu = g[i] * s;
    du[i] = da[i] * silu;
    dg[i] = da[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
  }
}

double yarn_mscale(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

std::vector<double> rope_inverse_frequencies(int64_t dim, double theta,
                                             const RopeScaling& scaling) {
  FM_CHECK_ARG(dim % 2 == 0, "rope dimension ", dim, " must be even");
  const int64_t half = dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
  if (scaling.type.empty()) return inv_freq;
  FM_CHECK_ARG(scaling.type == "yarn", "rope_scaling type \"", scaling.type, "\" is not supported");
  FM_CHECK_ARG(scaling.factor >= 1.0 && scaling.original_max_position_embeddings > 0,
               "rope_scaling: factor must be >= 1 and original_max_position_embeddings > 0");
  const double pi = 3.14159265358979323846;
  const auto correction = [&](double rotations) {
    return static_cast<double>(dim) *
           std::log(static_cast<double>(scaling.original_max_position_embeddings) /
                    (rotations * 2.0 * pi)) /
           (2.0 * std::log(theta));
  };
  const double low = std::max(std::floor(correction(scaling.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction(scaling.beta_slow)), static_cast<double>(dim - 1));
  if (high == low) high += 0.001;  // as the reference: avoid a zero-width ramp
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extra = inv_freq[i], inter = extra / scaling.factor;
    inv_freq[i] = inter * ramp + extra * (1.0 - ramp);
  }
  return inv_freq;
}

double attention_softmax_scale(int64_t head_dim, const RopeScaling& scaling) {
  double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  if (!scaling.type.empty() && scaling.mscale_all_dim != 0.0) {
    const double m = yarn_mscale(scaling.factor, scaling.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

RopeTable make_rope_table(int64_t dim, int64_t positions, double theta,
                          const RopeScaling& scaling) {
  const std::vector<double> inv_freq = rope_inverse_frequencies(dim, theta, scaling);
  const double magnitude = scaling.type.empty()
                               ? 1.0
                               : yarn_mscale(scaling.factor, scaling.mscale) /
                                     yarn_mscale(scaling.factor, scaling.mscale_all_dim);
  RopeTable t;
  t.dim = dim;
  t.positions = positions;
  const int64_t half = dim / 2;
  t.cos.resize(static_cast<size_t>(positions * half));
  t.sin.resize(static_cast<size_t>(positions * half));
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * inv_freq[i];
      t.cos[p * half + i] = static_cast<float>(std::cos(angle) * magnitude);
      t.sin[p * half + i] = static_cast<float>(std::sin(angle) * magnitude);
    }
  return t;
}

void rope_apply(const RopeTable& table, float* x, int64_t pos, bool inverse) {
  const int64_t half = table.dim / 2;
  const float* c = table.cos.data() + pos * half;
  const float* s = table.sin.data() + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    const float si = inverse ? -s[i] : s[i];
    x[2 * i] = x0 * c[i] - x1 * si;
    x[2 * i + 1] = x0 * si + x1 * c[i];
  }
}

double cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                     float* dlogits, float scale) {
  std::vector<double> row_loss(static_cast<size_t>(rows));
  parallel_for(
      rows,
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* l = logits + r * vocab;
          const int32_t t = targets[r];
          FM_CHECK(t >= 0 && t < vocab, "target ", t, " out of the vocabulary ", vocab);
          float mx = l[0];
          for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, l[i]);
          double sum = 0;
          for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(l[i] - mx));
          row_loss[r] = std::log(sum) + mx - l[t];
          if (dlogits) {
            float* d = dlogits + r * vocab;
            const double inv = 1.0 / sum;
            for (int64_t i = 0; i < vocab; ++i)
              d[i] = static_cast<float>(std::exp(static_cast<double>(l[i] - mx)) * inv * scale);
            d[t] -= scale;
          }
        }
      },
      model_threads(), 16);
  double total = 0;
  for (double v : row_loss) total += v;
  return total / static_cast<double>(rows);
}

}  // namespace fp8moe
