// route_backward_cuda (moe/router_backward_cuda.h): a warp per token. Lanes k < K hold the
// chosen index, gradient and score; every lane forms S and sum g s in k order by broadcasts (the
// CPU's order, double, explicit _rn operations), the warp zeroes the row, then lane k writes its
// expert's gradient unless a later k repeats the index.
#include <cuda_runtime.h>

#include <algorithm>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"
#include "fp8moe/moe/router_backward_cuda.h"
#include "fp8moe/moe/router_cuda.h"

namespace fp8moe {
namespace {

constexpr int kWarpsPerBlock = 8;

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_backward_kernel(const float* __restrict__ scores, const int32_t* __restrict__ topk_idx,
                          const float* __restrict__ grad_weight, int64_t tokens, int E, int K,
                          double c, bool norm, float* grad_logits, uint32_t* status) {
  const int lane = threadIdx.x % 32;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; t < tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    int32_t idx = -1;
    float g = 0.0f, s = 0.0f;
    if (lane < K) {
      idx = topk_idx[t * K + lane];
      g = grad_weight[t * K + lane];
    }
    const bool bad = lane < K && (idx < 0 || idx >= E);
    const bool any_bad = __any_sync(0xFFFFFFFFu, bad);
    if (lane < K && !any_bad) s = scores[t * E + idx];
    float* row = grad_logits + t * E;
    for (int e = lane; e < E; e += 32) row[e] = 0.0f;
    if (any_bad) {
      if (lane == 0 && status != nullptr) atomicOr(status, kRouterBackwardBadIndex);
      continue;
    }
    double S = 0.0, gs = 0.0;
    for (int k = 0; k < K; ++k) {
      const double sk = __shfl_sync(0xFFFFFFFFu, s, k);
      const double gk = __shfl_sync(0xFFFFFFFFu, g, k);
      S = __dadd_rn(S, sk);
      gs = __dadd_rn(gs, __dmul_rn(gk, sk));
    }
    bool last = true;  // no later k repeats this lane's index
    for (int k = 0; k < K; ++k) {
      const int32_t ik = __shfl_sync(0xFFFFFFFFu, idx, k);
      if (k > lane && ik == idx) last = false;
    }
    __syncwarp();  // the zeros above are ordered before the values below
    if (lane < K && last) {
      const double sj = s;
      const double grad_s = norm ? __dmul_rn(c, __dsub_rn(__ddiv_rn(static_cast<double>(g), S),
                                                          __ddiv_rn(gs, __dmul_rn(S, S))))
                                 : __dmul_rn(c, static_cast<double>(g));
      row[idx] = static_cast<float>(__dmul_rn(__dmul_rn(grad_s, sj), __dsub_rn(1.0, sj)));
    }
  }
}

}  // namespace

void route_backward_cuda(const RouterConfig& config, const float* scores, const int32_t* topk_idx,
                         const float* grad_weight, int64_t tokens, float* grad_logits,
                         uint32_t* status, cudaStream_t stream) {
  validate_router_config(config);
  const int E = config.n_routed_experts, K = config.num_experts_per_tok;
  FM_CHECK_ARG(K >= 1 && K <= kRouterCudaMaxTopK, "route_backward_cuda: top-k ", K,
               " must be in [1, ", kRouterCudaMaxTopK, "]");
  FM_CHECK_ARG(tokens >= 0 && tokens < (int64_t{1} << 31), "route_backward_cuda: tokens ", tokens);
  if (tokens == 0) return;
  FM_CHECK_ARG(
      scores != nullptr && topk_idx != nullptr && grad_weight != nullptr && grad_logits != nullptr,
      "route_backward_cuda: null scores, topk_idx, grad_weight or grad_logits");
  const int64_t blocks =
      std::min<int64_t>((tokens + kWarpsPerBlock - 1) / kWarpsPerBlock, int64_t{1} << 30);
  route_backward_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      scores, topk_idx, grad_weight, tokens, E, K,
      static_cast<double>(config.routed_scaling_factor), config.norm_topk_prob, grad_logits,
      status);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe
