// Dequantise, transpose, requantise: a 1x128-scaled E4M3 matrix x [rows, cols] (scales along
// cols) becomes x^T [cols, rows] E4M3 scaled 1x128 along the old rows, the K-major operand the
// weight-gradient GEMMs read (fp8_gemm_nt_kgrouped_wgrad's A or B over tokens) when the
// activation arrives in FP8 only (the DeepSeek-V3 report's "dequantise, transpose, requantise").
//   v[r, c]       = e4m3(codes[r, c]) * scale(r, c / 128)   (one FP32 multiply; the CPU's
//                   Fp8MatrixRef::value), 0 for rows with grouped_layout[r] < 0 (padding: never
//                   read, so NaN codes or scales there do not matter)
//   codes_t[c, r] = quantize_1x128 of v^T along r exactly as fp8moe::quantize does (scale =
//                   amax / 448 floored at FLT_MIN, 1 for an all-zero tile, power of two with
//                   pow2_scales; IEEE division, round-to-nearest-even, saturating)
//   scales_t      M-major over [cols, rows]: [rows / 128][padded_rows(cols)], padding entries 0
//                 (fp8_gemm.h's sa / sb of the wgrad GEMMs).
// Input scales: ScaleLayout::kRowMajor [rows][cols/128] or kMnMajor [cols/128][padded_rows(rows)].
// rows and cols must be multiples of 128 (the experts' contiguous layout: each expert's rows start
// at a multiple of 128, so every 128-row tile belongs to one expert); codes [rows, ld] (ld % 16 ==
// 0, 16-byte aligned), codes_t [cols, rows] (leading dimension rows). Device pointers,
// stream-ordered, allocation-free, CUDA-graph capturable; bad shapes throw kInvalidArgument.
// Test: test_kernels_gpu --gtest_filter='Requant*' (bit for bit against the reference below).
#pragma once

#include "fp8moe/core/cuda_stream.h"

#include <cstdint>

#include "fp8moe/kernels/quantize.h"

namespace fp8moe::kernels {

void requantize_1x128_transpose(const uint8_t* codes, int64_t ld, const float* scales,
                                ScaleLayout layout, int64_t rows, int64_t cols,
                                const int32_t* grouped_layout, bool pow2_scales, uint8_t* codes_t,
                                float* scales_t, cudaStream_t stream);

// CPU reference (host pointers, same arguments and results).
void requantize_1x128_transpose_reference(const uint8_t* codes, int64_t ld, const float* scales,
                                          ScaleLayout layout, int64_t rows, int64_t cols,
                                          const int32_t* grouped_layout, bool pow2_scales,
                                          uint8_t* codes_t, float* scales_t);

}  // namespace fp8moe::kernels
