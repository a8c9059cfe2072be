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

}  // namespace fp8moe
