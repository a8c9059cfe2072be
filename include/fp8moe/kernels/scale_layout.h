// 1x128 activation scales arrive row-major, one row of ceil(K/128) scales per token: that is what
// the CPU quantisation, the EP dispatch and most producers write, because the token is the unit
// they work on. The GEMMs read them M-major (see fp8_gemm.h), because TMA loads one K block's
// scales for a whole row tile as one contiguous 16-byte-aligned box. This converts between them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fp8moe::kernels {

// in  [batches][rows][kb]                 (row-major per token)
// out [batches][kb][padded_rows(rows)]    (M-major, padding entries 0; fp8_gemm.h's sa layout:
//                                          batches = 1 for the dense and contiguous forms, the
//                                          group count with rows = max_m for the masked form)
// Device pointers; `in` and `out` must not overlap. Stream-ordered, capturable.
void scales_to_mn_major(const float* in, int64_t batches, int64_t rows, int64_t kb, float* out,
                        cudaStream_t stream);

// The gathered form's A scales (fp8_gemm_nt_grouped_contiguous_gathered): out
// [kb][padded_rows(rows)] M-major, out[c][r] = in[index[r] * in_stride + c]; 0 where index[r] < 0
// and in the padding entries. in_stride in floats (>= kb): the scales may sit inside larger
// records. Device pointers (index int32 [rows]); `in` and `out` must not overlap. Stream-ordered,
// capturable.
void gather_scales_to_mn_major(const float* in, int64_t in_stride, const int32_t* index,
                               int64_t rows, int64_t kb, float* out, cudaStream_t stream);

}  // namespace fp8moe::kernels
