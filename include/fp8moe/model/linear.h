// A linear layer y[M,N] = x[M,K] W[N,K]^T in one of three precisions, forward and backward:
//   fp32  plain FP32 GEMMs.
//   bf16  operands rounded to BF16, FP32 accumulation, outputs (y, dx) rounded to BF16; the
//         weight gradient stays FP32.
//   fp8   DeepSeek-V3's recipe, as the GPU kernels compute it (gemm_fp8_reference with the
//         default AccumulatorModel: promotion to FP32 every 128 products):
//           Fprop  x 1x128-quantised (E4M3) x W 128x128-quantised        -> y (BF16)
//           Dgrad  dy 1x128-quantised x W^T (the same 128x128 blocks, transposed) -> dx (BF16)
//           Wgrad  dy^T and x^T, both 1x128-quantised along the token axis -> dW (FP32, added)
//         The input x is cached for backward in FP8 (its Fprop codes and scales); with
//         pow2_activation_scales its scales are powers of two, as the report does for the
//         activations it re-quantises along the other axis in backward.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fp8moe/fp8/quantize.h"

namespace fp8moe {

enum class Precision { kFp32, kBf16, kFp8 };
const char* precision_name(Precision p);
Precision parse_precision(const std::string& name);  // "fp32" | "bf16" | "fp8"

struct LinearOptions {
  Precision precision = Precision::kFp32;
  bool pow2_activation_scales = false;
  int threads = 0;  // 0 = model_threads()
};

// What forward keeps for backward.
struct LinearCache {
  int64_t m = 0, n = 0, k = 0;
  std::vector<float> x;  // fp32 / bf16: the (rounded) input
  std::vector<float> w;  // bf16: the rounded weight
  QuantizedMatrix xq;    // fp8: the input's Fprop quantisation (the FP8 cache)
  QuantizedMatrix wq;    // fp8: the weight's 128x128 quantisation
};

void linear_forward(const LinearOptions& options, const float* x, int64_t m, const float* w,
                    int64_t n, int64_t k, float* y, LinearCache* cache);

// dx (may be null: no input gradient) is overwritten; dw is added to.
void linear_backward(const LinearOptions& options, const LinearCache& cache, const float* w,
                     const float* dy, float* dx, float* dw);

// The 128x128-block quantisation of W^T from that of W (blocks transpose with their scales;
// the codes are those quantize() gives for W^T).
QuantizedMatrix transpose_block_quantized(const QuantizedMatrix& q);

}  // namespace fp8moe
