// route_cuda against route() on fresh random inputs: indices exact, weights to rounding (the
// relative error is printed per shape), outputs poisoned before each launch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/moe/router.h"
#include "fp8moe/moe/router_cuda.h"

namespace fp8moe {
namespace {

struct Case {
  const char* name;
  RouterConfig config;
  int64_t tokens;
  bool bias;
  bool ties;  // logits on a coarse grid so that equal scores are common
};

RouterConfig make(int E, int K, int G, int TG, float scale, bool norm) {
  RouterConfig c;
  c.n_routed_experts = E;
  c.num_experts_per_tok = K;
  c.n_group = G;
  c.topk_group = TG;
  c.routed_scaling_factor = scale;
  c.norm_topk_prob = norm;
  return c;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  FM_CHECK_CUDA(cudaMalloc(&p, sizeof(T) * std::max<size_t>(1, v.size())));
  if (!v.empty())
    FM_CHECK_CUDA(cudaMemcpy(p, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice));
  return p;
}

TEST(RouterGpu, MatchesCpuReference) {
  const Case cases[] = {
      {"v3", make(256, 8, 8, 4, 2.5f, true), 8192, true, false},
      {"v3_nobias", make(256, 8, 8, 4, 2.5f, true), 4096, false, false},
      {"v3_ties", make(256, 8, 8, 4, 2.5f, true), 4096, true, true},
      {"e64_g8_tg3_k6", make(64, 6, 8, 3, 1.0f, true), 5000, true, false},
      {"e64_nogroups", make(64, 6, 1, 1, 1.0f, false), 3000, true, true},
      {"e160_g32_tg1_k2", make(160, 2, 32, 1, 16.0f, true), 2049, true, false},
      {"e1024_k32", make(1024, 32, 16, 8, 2.5f, true), 513, true, false},
      {"k1", make(32, 1, 4, 2, 1.0f, true), 1000, true, true},
      {"empty", make(256, 8, 8, 4, 2.5f, true), 0, true, false},
  };
  uint64_t seed = 20261126;
  for (const Case& c : cases) {
    const int E = c.config.n_routed_experts, K = c.config.num_experts_per_tok;
    const int64_t T = c.tokens;
    PhiloxStream rng(seed++, 0);
    std::vector<float> logits(T * E), bias(E);
    for (auto& v : logits)
      v = c.ties ? std::round(rng.normal() * 2.0f) * 0.5f : rng.normal() * 2.0f;
    for (auto& v : bias)
      v = c.bias ? (c.ties ? std::round(rng.uniform(-2, 2)) * 0.125f : rng.uniform(-0.3f, 0.3f))
                 : 0.0f;
    const RouterOutput ref = route(c.config, logits.data(), T, c.bias ? bias.data() : nullptr);

    float* d_logits = to_device(logits);
    float* d_bias = to_device(bias);
    int32_t* d_idx = nullptr;
    float *d_w = nullptr, *d_s = nullptr;
    FM_CHECK_CUDA(cudaMalloc(&d_idx, sizeof(int32_t) * std::max<int64_t>(1, T * K)));
    FM_CHECK_CUDA(cudaMalloc(&d_w, sizeof(float) * std::max<int64_t>(1, T * K)));
    FM_CHECK_CUDA(cudaMalloc(&d_s, sizeof(float) * std::max<int64_t>(1, T * E)));
    FM_CHECK_CUDA(cudaMemset(d_idx, 0xff, sizeof(int32_t) * std::max<int64_t>(1, T * K)));
    FM_CHECK_CUDA(cudaMemset(d_w, 0xff, sizeof(float) * std::max<int64_t>(1, T * K)));  // NaN
    FM_CHECK_CUDA(cudaMemset(d_s, 0xff, sizeof(float) * std::max<int64_t>(1, T * E)));
    route_cuda(c.config, d_logits, T, c.bias ? d_bias : nullptr, d_idx, d_w, d_s, nullptr);
    FM_CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<int32_t> idx(T * K);
    std::vector<float> w(T * K), s(T * E);
    FM_CHECK_CUDA(cudaMemcpy(idx.data(), d_idx, sizeof(int32_t) * T * K, cudaMemcpyDeviceToHost));
    FM_CHECK_CUDA(cudaMemcpy(w.data(), d_w, sizeof(float) * T * K, cudaMemcpyDeviceToHost));
    FM_CHECK_CUDA(cudaMemcpy(s.data(), d_s, sizeof(float) * T * E, cudaMemcpyDeviceToHost));

    int64_t idx_mismatch = 0, score_mismatch = 0;
    double max_rel = 0;
    for (int64_t i = 0; i < T * K; ++i) {
      idx_mismatch += idx[i] != ref.topk_idx[i];
      const double rel = std::abs(w[i] - ref.topk_weight[i]) / std::abs(ref.topk_weight[i]);
      max_rel = std::max(max_rel, std::isnan(w[i]) ? INFINITY : rel);
    }
    for (int64_t i = 0; i < T * E; ++i) score_mismatch += s[i] != ref.scores[i];

    // Time the V3-shaped launches (not an anchor-comparing benchmark: a sanity figure).
    cudaEvent_t start, stop;
    FM_CHECK_CUDA(cudaEventCreate(&start));
    FM_CHECK_CUDA(cudaEventCreate(&stop));
    FM_CHECK_CUDA(cudaEventRecord(start));
    const int reps = 20;
    for (int r = 0; r < reps; ++r)
      route_cuda(c.config, d_logits, T, c.bias ? d_bias : nullptr, d_idx, d_w, nullptr, nullptr);
    FM_CHECK_CUDA(cudaEventRecord(stop));
    FM_CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    FM_CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    std::printf(
        "router_gpu %-16s T=%-6lld E=%-4d K=%-2d idx_mismatch=%lld score_mismatch=%lld "
        "max_rel_err=%.3g us=%.1f\n",
        c.name, static_cast<long long>(T), E, K, static_cast<long long>(idx_mismatch),
        static_cast<long long>(score_mismatch), max_rel, 1e3 * ms / reps);
    EXPECT_EQ(idx_mismatch, 0) << c.name;
    EXPECT_EQ(score_mismatch, 0) << c.name;
    EXPECT_LE(max_rel, 1e-6) << c.name;
    cudaFree(d_logits);
    cudaFree(d_bias);
    cudaFree(d_idx);
    cudaFree(d_w);
    cudaFree(d_s);
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
}

TEST(RouterGpu, RejectsShapesTheKernelCannotTake) {
  RouterConfig c = make(2048, 8, 8, 4, 1.0f, true);
  EXPECT_THROW(route_cuda(c, nullptr, 1, nullptr, nullptr, nullptr, nullptr, nullptr), Error);
  c = make(128, 8, 64, 32, 1.0f, true);
  EXPECT_THROW(route_cuda(c, nullptr, 1, nullptr, nullptr, nullptr, nullptr, nullptr), Error);
}

}  // namespace
}  // namespace fp8moe
