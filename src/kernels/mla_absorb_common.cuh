// What the two forms of the MLA absorb kernels share (mla_absorb.cu on the CUDA cores,
// mla_absorb_tc.cu on the tensor cores).
#pragma once

#include <cstdint>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/mla_absorb.h"

namespace fp8moe::kernels {

void mla_absorb_check_dims(const char* who, const MlaAbsorbDims& d, int64_t tokens);

// q_pe rides along after the latent: q [T, heads, nope + rope] -> q_lat [T, heads, latent + rope]
// for tokens [t0, t0 + n) of head h, copied by the block's threads (one block a head does it).
__device__ __forceinline__ void copy_q_pe(const bf16* q, bf16* q_lat, const MlaAbsorbDims& d,
                                          int64_t h, int64_t t0, int n) {
  const int64_t qd = d.nope_dim + d.rope_dim, od = d.latent_dim + d.rope_dim;
  for (int64_t i = threadIdx.x; i < n * d.rope_dim; i += blockDim.x) {
    const int64_t t = t0 + i / d.rope_dim, r = i % d.rope_dim;
    q_lat[(t * d.heads + h) * od + d.latent_dim + r] = q[(t * d.heads + h) * qd + d.nope_dim + r];
  }
}

}  // namespace fp8moe::kernels
