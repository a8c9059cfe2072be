// route_backward (moe/router.h) on the GPU: the gradient of the selected gate weights [T, K] (as
// MoeLayerGpu's backward gives it) -> the gradient of the router logits [T, E], through the
// normalisation and the sigmoid. In `moe` beside router_cuda.h (its forward); a header of its own
// so that router_cuda.h stays as it is.
// Arithmetic: route_backward's, operation for operation in double with IEEE round-to-nearest and
// no FMA contraction (S and sum g_k s_k in k order; grad_s = c * (g / S - gs / (S * S)) or c * g;
// out = float(grad_s * s * (1 - s))): equal bit for bit to route_backward. Unchosen experts get 0;
// a repeated index keeps the last k's value (as the CPU's loop).
// An index outside [0, E) sets kRouterBackwardBadIndex in `status` (device uint32, may be null)
// and that token's row is all zeros.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp8moe/moe/router.h"

namespace fp8moe {

inline constexpr uint32_t kRouterBackwardBadIndex = 8u;

// scores [T, E] (route_cuda's scores: the sigmoid affinities), topk_idx / grad_weight [T, K],
// grad_logits [T, E] (overwritten). Device pointers; asynchronous on `stream`. config as
// route_cuda's (validate_router_config; K <= 32); E a multiple of 4 is not required.
void route_backward_cuda(const RouterConfig& config, const float* scores, const int32_t* topk_idx,
                         const float* grad_weight, int64_t tokens, float* grad_logits,
                         uint32_t* status, cudaStream_t stream);

}  // namespace fp8moe
