// DeepSeek-V3's gate (sigmoid scores, selection bias, group-limited top-k, normalised weights)
// on the GPU, one warp per token.
// Checked against route() in src/moe/router.cpp (indices exact, weights to rounding).
// Test: build-device/tests/test_moe_gpu --gtest_filter='RouterGpu*'
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/moe/router_cuda.h"

namespace fp8moe {

namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Warp-wide arg-max by (value desc, index asc); every lane gets the winner. Index -1 = none.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
    if (oi >= 0 && (i < 0 || better(ov, oi, v, i))) {
      v = ov;
      i = oi;
    }
  }
}

__global__ void router_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                              int64_t tokens, int E, int G, int topk_group, int K, float scaling,
                              bool norm, int32_t* __restrict__ topk_idx,
                              float* __restrict__ topk_weight, float* __restrict__ scores_out) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= tokens) return;
  float* s = smem + warp * 2 * E;  // unbiased scores
  float* b = s + E;                // biased scores (set to -inf once taken or excluded)
  const int per_group = E / G;

  // Stage 1: scores. NOTE: double sigmoid rounded once, exactly as router_sigmoid() on the CPU.
  for (int e = lane; e < E; e += 32) {
    const float x = logits[t * E + e];
    const float sc = static_cast<float>(1.0 / (1.0 + exp(-static_cast<double>(x))));
    s[e] = sc;
    b[e] = sc + (bias ? bias[e] : 0.0f);
    if (scores_out) scores_out[t * E + e] = sc;
  }
  __syncwarp();

  // Stage 2: group scores (lane g owns group g) and the topk_group best groups.
  unsigned kept_mask = 0;
  if (topk_group == G) {
    kept_mask = G == 32 ? 0xffffffffu : ((1u << G) - 1u);
  } else {
    float gscore = -INFINITY;
    if (lane < G) {
      float m1 = -INFINITY, m2 = -INFINITY;
      for (int j = 0; j < per_group; ++j) {
        const float v = b[lane * per_group + j];
        if (v > m1) {
          m2 = m1;
          m1 = v;
        } else if (v > m2) {
          m2 = v;
        }
      }
      gscore = per_group >= 2 ? m1 + m2 : m1;
    }
    for (int pick = 0; pick < topk_group; ++pick) {
      float v = gscore;
      int i = (lane < G && !((kept_mask >> lane) & 1u)) ? lane : -1;
      warp_argmax(v, i);
      kept_mask |= 1u << i;
    }
  }

  // Stage 3: K arg-max passes over the kept groups' experts.
  int my_choice = 0x7fffffff;  // lane k < K keeps pick k
  for (int pick = 0; pick < K; ++pick) {
    float v = -INFINITY;
    int i = -1;
    for (int e = lane; e < E; e += 32) {
      if (!((kept_mask >> (e / per_group)) & 1u)) continue;
      const float be = b[e];
      // NOTE: -inf marks a taken expert (a finite bias never yields it; route() rejects
      // infinite biases).
      if (be == -INFINITY) continue;
      if (i < 0 || better(be, e, v, i)) {
        v = be;
        i = e;
      }
    }
    warp_argmax(v, i);
    if (lane == pick) my_choice = i;
    if (lane == 0) b[i] = -INFINITY;
    __syncwarp();
  }

  // Stage 4: sort the K choices ascending (rank by counting), then weights summed in order.
  int rank = 0;
  for (int j = 0; j < K; ++j) {
    const int other = __shfl_sync(0xffffffffu, my_choice, j);
    if (lane < K && other < my_choice) ++rank;
  }
  int* sorted = reinterpret_cast<int*>(b);  // b is no longer needed
  __syncwarp();
  if (lane < K) sorted[rank] = my_choice;
  __syncwarp();
  if (lane == 0) {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += s[sorted[k]];
    for (int k = 0; k < K; ++k) {
      const float sc = s[sorted[k]];
      topk_idx[t * K + k] = sorted[k];
      topk_weight[t * K + k] = (norm ? sc / sum : sc) * scaling;
    }
  }
}

}  // namespace

void route_cuda(const RouterConfig& config, const float* logits, int64_t tokens, const float* bias,
                int32_t* topk_idx, float* topk_weight, float* scores, cudaStream_t stream) {
  validate_router_config(config);
  const int E = config.n_routed_experts, G = config.n_group, K = config.num_experts_per_tok;
  FM_CHECK_ARG(E <= kRouterCudaMaxExperts, "route_cuda: n_routed_experts=", E, " exceeds ",
               kRouterCudaMaxExperts);
  FM_CHECK_ARG(G <= kRouterCudaMaxGroups, "route_cuda: n_group=", G, " exceeds ",
               kRouterCudaMaxGroups);
  FM_CHECK_ARG(K <= kRouterCudaMaxTopK, "route_cuda: num_experts_per_tok=", K, " exceeds ",
               kRouterCudaMaxTopK);
  FM_CHECK_ARG(tokens >= 0, "route_cuda: tokens=", tokens);
  if (tokens == 0) return;
  const int64_t blocks = (tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const size_t smem = sizeof(float) * 2 * E * kWarpsPerBlock;
  router_kernel<<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, smem, stream>>>(
      logits, bias, tokens, E, G, config.topk_group, K, config.routed_scaling_factor,
      config.norm_topk_prob, topk_idx, topk_weight, scores);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe
