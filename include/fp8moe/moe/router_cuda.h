// The router on the GPU: the same selection and weights as route() (router.h), on device
// arrays. Indices match the CPU exactly and weights bit for bit in practice (both compute the
// sigmoid in double, round once, and sum the chosen scores in ascending id order); tests allow
// rounding. NaN logits are not checked here (route() rejects them on the CPU).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp8moe/moe/router.h"

namespace fp8moe {

// Limits of the kernel (checked on the host before launch, kInvalidArgument):
inline constexpr int kRouterCudaMaxExperts = 1024;
inline constexpr int kRouterCudaMaxGroups = 32;
inline constexpr int kRouterCudaMaxTopK = 32;

// logits [T, E], bias [E] (nullptr = zeros), outputs topk_idx / topk_weight [T, K] and, when
// not null, scores [T, E]. All pointers are device memory; asynchronous on `stream`.
void route_cuda(const RouterConfig& config, const float* logits, int64_t tokens, const float* bias,
                int32_t* topk_idx, float* topk_weight, float* scores, cudaStream_t stream);

}  // namespace fp8moe
