// The routed and shared experts' activation between their two FP8 GEMMs, fused with the 1x128
// quantisation the down projection reads, and its backward. gate_up is the up-projection GEMM's
// output [rows, 2 * inter] (BF16): columns [0, inter) the gate g, [inter, 2 * inter) the up u (one
// GEMM over the concatenated weights w13 = [w_gate; w_up], N = 2 * inter).
//   forward:  h[r, j] = ((g * s) * u) * w in FP32, in that order (model/ops.h's swiglu_forward,
//             then the row's weight), s = 1 / (1 + exp(-g)), w = row_scale ? row_scale[r] : 1
//             (row_scale null: no multiply); h quantised 1x128 along j exactly as
//             quantize_1x128 does (scale = amax / 448, floored at FLT_MIN, 1 for an all-zero tile,
//             power of two with pow2_scales; IEEE division, round-to-nearest-even, saturating).
//   backward: from dh [rows, inter] (BF16) and the forward's gate_up (recomputed, not cached h):
//             dg = dh * w * u * s * (1 + g * (1 - s)), du = dh * w * g * s with s = sigmoid(g),
//             w = row_scale[r] or 1; d_row_scale[r] = sum_j dh * silu(g) * u (FP32) if asked.
// Rows: `SwigluRows` says which rows are real. Padding rows (grouped_layout[r] < 0 in the
// contiguous form, r % group_rows >= masked_m[r / group_rows] in the masked form) are never read:
// the forward writes their codes 0 and scale 1 (what quantising a zero row gives), the backward
// writes their d_gate_up 0 and d_row_scale 0. Their GEMM outputs are left untouched by the
// grouped GEMMs, so reading them could meet NaN poison.
// Scales: ScaleLayout::kRowMajor [rows][inter/128]; kMnMajor [inter/128][padded_rows(rows)]
// (padding entries 0), and for the masked form [groups][inter/128][padded_rows(group_rows)], what
// fp8_gemm_nt_grouped_masked reads. inter must be a multiple of 128 (thrown otherwise).
// Device pointers; stream-ordered, allocation-free, CUDA-graph capturable. Non-finite inputs are
// counted into `nonfinite` if given (quantize.h's NonFiniteReport; positions are of gate_up).
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstdint>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/quantize.h"

namespace fp8moe::kernels {

struct SwigluRows {
  const int32_t* grouped_layout = nullptr;  // [rows] contiguous form: < 0 marks padding rows
  const int32_t* masked_m = nullptr;        // [rows / group_rows] masked form: valid rows a group
  int64_t group_rows = 0;                   // masked form: max_m (rows = groups * max_m)
};

void swiglu_quantize_1x128(const bf16* gate_up, int64_t ld, int64_t rows, int64_t inter,
                           const float* row_scale, SwigluRows which, bool pow2_scales,
                           uint8_t* codes, int64_t ld_codes, float* scales, ScaleLayout layout,
                           cudaStream_t stream, NonFiniteReport* nonfinite = nullptr);

void swiglu_backward(const bf16* gate_up, int64_t ld, const bf16* dh, int64_t ld_dh, int64_t rows,
                     int64_t inter, const float* row_scale, SwigluRows which, bf16* d_gate_up,
                     int64_t ld_d, float* d_row_scale, cudaStream_t stream);

// CPU references (host pointers, same semantics; bf16 values as fp8moe::bf16): the GPU tests
// compare against them, and CI tests them against model/ops' swiglu and fp8/quantize.
void swiglu_quantize_1x128_reference(const bf16* gate_up, int64_t ld, int64_t rows, int64_t inter,
                                     const float* row_scale, const int32_t* grouped_layout,
                                     const int32_t* masked_m, int64_t group_rows, bool pow2_scales,
                                     uint8_t* codes, int64_t ld_codes, float* scales,
                                     ScaleLayout layout);
void swiglu_backward_reference(const bf16* gate_up, int64_t ld, const bf16* dh, int64_t ld_dh,
                               int64_t rows, int64_t inter, const float* row_scale,
                               const int32_t* grouped_layout, const int32_t* masked_m,
                               int64_t group_rows, bf16* d_gate_up, int64_t ld_d,
                               float* d_row_scale);

}  // namespace fp8moe::kernels
