// The routed experts' FP8 FFN on the CPU: the weights quantised as the GPU reads them, and the
// reference that defines what ExpertFfnGpu (moe/expert_ffn_gpu.h) computes:
//   y[r] = down(h) with h = swiglu(x[r] W_gate^T, x[r] W_up^T) quantised 1x128, for each row r
//   whose expert e = grouped_layout[r] >= 0, with expert e's weights:
//   1. gate_up = x[r] * w13[e]^T (N = 2 * inter, K = hidden): gemm_fp8_reference (promoted every
//      128 K elements, fmaf(partial, sa * sb, acc)), rounded to BF16 (the GPU GEMM's output);
//   2. h codes + scales = kernels::swiglu_quantize_1x128_reference of that row (row_scale[r]
//      applied when given; pow2_scales as asked);
//   3. y[r] = h * w2[e]^T (N = hidden, K = inter), gemm_fp8_reference rounded to BF16.
// Rows with grouped_layout[r] < 0 (padding) are not written.
// Tests: tests/moe/expert_ffn_test.cpp (against a plain FP32 FFN; build/tests/test_moe
// --gtest_filter='ExpertFfn*') and the GPU forms in tests/moe/expert_ffn_gpu_test.cu.
#pragma once

#include <cstdint>
#include <vector>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/fp8/gemm_reference.h"
#include "fp8moe/fp8/quantize.h"

namespace fp8moe {

// G experts' weights, E4M3 with 128x128 scales (host memory), in the layout the grouped GEMMs read:
//   w13 [G][2I][H]  rows [0, I) the gate projection, [I, 2I) the up projection (one GEMM, N = 2I)
//   s13 [G][2I/128][H/128]
//   w2  [G][H][I]   the down projection
//   s2  [G][H/128][I/128]
struct ExpertWeightsHost {
  int64_t groups = 0, hidden = 0, inter = 0;
  std::vector<uint8_t> w13, w2;
  std::vector<float> s13, s2;

  Fp8MatrixRef w13_ref(int64_t expert) const;  // [2I, H] of one expert
  Fp8MatrixRef w2_ref(int64_t expert) const;   // [H, I] of one expert
};

// The transposed weights the backward's dgrad GEMMs read as B (host memory):
//   w13t [G][H][2I]  w13t[e][h][j] = w13[e][j][h];  s13t [G][H/128][2I/128]
//   w2t  [G][I][H]   w2t[e][i][h]  = w2[e][h][i];   s2t  [G][I/128][H/128]
// A 128x128 block's scale is the scale of the transposed block, so these are exact (codes and
// scales moved, nothing requantised).
struct ExpertWeightsTransposedHost {
  int64_t groups = 0, hidden = 0, inter = 0;
  std::vector<uint8_t> w13t, w2t;
  std::vector<float> s13t, s2t;

  Fp8MatrixRef w13t_ref(int64_t expert) const;  // [H, 2I] of one expert
  Fp8MatrixRef w2t_ref(int64_t expert) const;   // [I, H] of one expert
};
ExpertWeightsTransposedHost transpose_expert_weights(const ExpertWeightsHost& weights);

// Quantises FP32 weights gate [G][I][H], up [G][I][H], down [G][H][I] (row-major, nn.Linear's
// [out, in]) 128x128 with fp8moe::quantize's rounding. hidden and inter must be positive
// multiples of 128, groups >= 1 (kInvalidArgument naming the value otherwise); a NaN or infinity
// is an error naming the tensor and expert.
ExpertWeightsHost quantize_expert_weights(const float* gate, const float* up, const float* down,
                                          int64_t groups, int64_t hidden, int64_t inter,
                                          QuantizeOptions options = {});

// The reference above. x: [rows, hidden] 1x128 (any scale strides: row-major or M-major);
// grouped_layout [x.rows] (< 0: padding, not written); row_scale [x.rows] or null; y [x.rows,
// hidden] BF16 (leading dimension hidden). `model` is the accumulator of both GEMMs (the default
// is what the GPU kernels are checked against; others estimate the tensor cores' effect).
void expert_ffn_reference(const Fp8MatrixRef& x, const int32_t* grouped_layout,
                          const ExpertWeightsHost& weights, const float* row_scale,
                          bool pow2_scales, bf16* y, const AccumulatorModel& model = {},
                          int threads = 1);

// The backward of the reference above (what ExpertFfnGpu::backward_contiguous computes), on the
// contiguous layout: rows = sum(expert_rows), expert g's rows are [sum(expert_rows[0..g)), +
// expert_rows[g]) (each a multiple of 128, zero allowed) and each row r there has
// grouped_layout[r] == g or < 0 (padding; checked). R = rows, and with "real" = grouped_layout >=
// 0:
//   1. dy8 = quantize_1x128(dy with padding rows 0) along H; dyT8 = quantize_1x128(that^T) along
//      rows ([H, R]; 128-row tiles never straddle experts);
//   2. dh[r] = dy8[r] * w2t[e]^T (N = I, K = H), gemm_fp8_reference rounded to BF16 (real rows);
//   3. d_gate_up, d_row_scale = kernels::swiglu_backward_reference(gate_up, dh, row_scale) (padding
//      rows 0);
//   4. dgu8 = quantize_1x128(d_gate_up) along 2I; dguT8 = quantize_1x128(d_gate_up^T) along rows;
//   5. dx[r] = dgu8[r] * w13t[e]^T (N = H, K = 2I) rounded to BF16 (real rows; padding rows of dx
//      are not written);
//   6. h = swiglu_quantize_1x128_reference(gate_up, row_scale) (the forward's codes, recomputed),
//      hT8 = kernels::requantize_1x128_transpose_reference(h) [I, R];
//      dW2[e] += dyT8[:, rows of e] * hT8[:, rows of e]^T   (gemm_fp8_reference, accumulate);
//   7. xT8 = requantize_1x128_transpose_reference(x) [H, R] (padding rows 0);
//      dW13[e] += dguT8[:, rows of e] * xT8[:, rows of e]^T.
// All activation quantisations use pow2_scales as given. x: [R, hidden] 1x128 (any scale
// strides); gate_up [R, 2I] BF16 (the forward's, padding rows never read); dy [R, H] BF16
// (padding rows never read); dx [R, H] BF16; dw13 [G][2I][H] and dw2 [G][H][I] FP32, accumulated;
// row_scale [R] or null; d_row_scale [R] or null (padding rows 0).
// Tests: tests/moe/expert_ffn_backward_test.cpp (against the FP32 chain rule) and
// tests/moe/expert_ffn_backward_gpu_test.cu.
void expert_ffn_backward_reference(const Fp8MatrixRef& x, const int32_t* grouped_layout,
                                   const std::vector<int64_t>& expert_rows,
                                   const ExpertWeightsHost& weights, const bf16* gate_up,
                                   const bf16* dy, const float* row_scale, bool pow2_scales,
                                   bf16* dx, float* dw13, float* dw2, float* d_row_scale,
                                   int threads = 1);

}  // namespace fp8moe
