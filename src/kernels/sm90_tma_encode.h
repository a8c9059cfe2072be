// Host: the driver's cuTensorMapEncodeTiled, looked up once through the runtime's entry-point query
// (so nothing links libcuda directly). Defined in sm90_fp8_gemm_host.cu; used by the FP8 GEMMs'
// make_tma_2d and the MLA wgmma forward's 3D maps (sm90_mla_attention_fwd_wgmma.cu).
#pragma once

#include <cuda.h>

namespace fp8moe::kernels::sm90 {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// Throws (FM_CHECK) where the driver has no cuTensorMapEncodeTiled.
EncodeTiledFn encode_tiled_fn();

}  // namespace fp8moe::kernels::sm90
