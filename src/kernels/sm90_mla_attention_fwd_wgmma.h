// Internal: the wgmma form of the MLA attention forward (MlaForwardImpl::kWgmma, s21-af), kept in
// its own translation unit (sm90_mla_attention_fwd_wgmma.cu) so that the mma.sync kernels of
// sm90_mla_attention.cu keep their machine code. mla_attention_forward dispatches to it.
#pragma once

#include <cuda_runtime.h>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/mla_attention.h"

namespace fp8moe::kernels::detail {

// The caller (mla_attention_forward) has checked the shape, the grid limits and every pointer.
// ping_pong: MlaForwardImpl::kWgmmaPingPong (the two warpgroups' MMAs in turns).
void mla_attention_forward_wgmma(const bf16* q, const bf16* kv, const bf16* k_pe,
                                 MlaAttentionShape shape, float scale, bf16* out, float* lse,
                                 bool ping_pong, cudaStream_t stream);

}  // namespace fp8moe::kernels::detail
