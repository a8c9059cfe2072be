// A linear layer y[M,N] = x[M,K] W[N,K]^T on the GPU in DeepSeek-V3's FP8 recipe, forward and
// backward: what every projection of the model (attention's q/kv/o, the dense FFNs) runs on in a
// GPU trainer. The CPU reference is linear_forward / linear_backward with Precision::kFp8
// (fp8moe/model/linear.h), which this composes kernel for kernel:
//   Fprop  x (BF16) quantised 1x128 (kernels::quantize_1x128) x W 128x128 (kernels::fp8_gemm_nt)
//          -> y BF16; x's FP8 codes and scales are the cache the backward reads (the report's
//          FP8 activation cache).
//   Dgrad  dy 1x128 x W^T's 128x128 blocks (the same codes transposed, LinearWeightsDevice)
//          -> dx BF16; N not a multiple of 128 (e.g. the fused q_a + kv_a projection's 2112) runs
//          as K' = N rounded up to 128 with zero codes in the padding columns of both operands.
//   Wgrad  dy^T (kernels::quantize_1x128_transpose, the same pass as Dgrad's dy) and x^T
//          (kernels::requantize_1x128_transpose from the FP8 cache), both 1x128 along the tokens,
//          -> dW FP32 accumulated (kernels::fp8_gemm_nt_wgrad); M not a multiple of 128 runs over
//          M rounded up to 128 with zero rows.
// Calls only enqueue work on the given stream: no allocation, no host synchronisation, so a
// layer's forward and backward are capturable in a CUDA graph. Device pointers, 16-byte aligned;
// K a multiple of 128 (the Fprop GEMM's reduction), N a multiple of 8.
// Test: test_model_gpu --gtest_filter='LinearFp8Gpu*' (against the CPU reference).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/kernels/quantize.h"

namespace fp8moe {

// Views of a weight's two FP8 forms on the device:
//   w   [N, K] codes, sw  [ceil(N/128)][K/128] scales (the Fprop GEMM's B);
//   wt  [K, Np] codes (Np = N rounded up to 128; columns >= N are zero codes),
//   swt [K/128][Np/128] scales (the Dgrad GEMM's B).
struct LinearWeightsGpu {
  const uint8_t* w = nullptr;
  const float* sw = nullptr;
  const uint8_t* wt = nullptr;
  const float* swt = nullptr;
  int64_t n = 0, k = 0;
};

// The second form from the first, into given pointers (LinearWeightsDevice::refresh's step after
// the quantisation; also the expert weights' transposes): w [N, K] codes and sw
// [ceil(N/128)][K/128] scales -> wt [K, Np] (columns >= N zero codes) and swt [K/128][Np/128],
// Np = N rounded up to 128. Stream-ordered, capturable; K a multiple of 128, N of 8.
void transpose_fp8_weight_blocks(const uint8_t* w, const float* sw, int64_t n, int64_t k,
                                 uint8_t* wt, float* swt, cudaStream_t stream);

// Owns both FP8 forms of one weight. refresh() requantises them from the FP32 master weight on
// the device (once per optimizer step; stream-ordered, capturable), bit for bit the CPU's
// quantize(W, 128x128) and transpose_block_quantized.
class LinearWeightsDevice {
 public:
  LinearWeightsDevice(int64_t n, int64_t k);
  ~LinearWeightsDevice();
  LinearWeightsDevice(const LinearWeightsDevice&) = delete;
  LinearWeightsDevice& operator=(const LinearWeightsDevice&) = delete;

  // master: FP32 [N, K] row-major on the device. One launch (kernels::WeightQuantizer; its
  // job table is made on the first call with a master, synchronously: not inside a graph).
  void refresh(const float* master, cudaStream_t stream);
  LinearWeightsGpu view() const;

 private:
  int64_t n_ = 0, k_ = 0;
  void* buffer_ = nullptr;
  uint8_t *w_ = nullptr, *wt_ = nullptr;
  float *sw_ = nullptr, *swt_ = nullptr;
  std::unique_ptr<kernels::WeightQuantizer> quantizer_;
  const float* quantizer_master_ = nullptr;
};

struct LinearGpuOptions {
  bool pow2_activation_scales = false;  // LinearOptions::pow2_activation_scales
};

class LinearFp8Gpu {
 public:
  // Workspaces for up to max_rows tokens of one layer shape, allocated once.
  LinearFp8Gpu(int64_t max_rows, int64_t n, int64_t k, LinearGpuOptions options = {});
  ~LinearFp8Gpu();
  LinearFp8Gpu(const LinearFp8Gpu&) = delete;
  LinearFp8Gpu& operator=(const LinearFp8Gpu&) = delete;

  // x [M, K] BF16 -> y [M, N] BF16 (0 <= M <= max_rows). Keeps x's FP8 codes for backward().
  void forward(const bf16* x, int64_t m, const LinearWeightsGpu& w, bf16* y, cudaStream_t stream);
  // For the last forward's x: dy [M, N] BF16 -> dx [M, K] BF16 (null: no input gradient) and
  // dw [N, K] FP32 += dy^T x (dw = dy^T x with kOverwrite: the first micro-batch). The weights
  // must be the forward's.
  void backward(const bf16* dy, const LinearWeightsGpu& w, bf16* dx, float* dw, cudaStream_t stream,
                kernels::WgradOutput dw_output = kernels::WgradOutput::kAccumulate);

  int64_t max_rows() const { return max_rows_; }

 private:
  void check_weights(const char* what, const LinearWeightsGpu& w) const;
  // The split workspace for an M x N x K Fprop or Dgrad GEMM, or none when it needs more.
  kernels::GemmWorkspace gemm_workspace(int64_t m, int64_t n, int64_t k) const;

  int64_t max_rows_ = 0, n_ = 0, k_ = 0, np_ = 0, mp_max_ = 0;
  LinearGpuOptions options_;
  int64_t m_ = -1;  // the last forward's rows (-1: none yet)
  void* buffer_ = nullptr;
  // The Fprop and Dgrad GEMMs' split workspace (kernels::GemmWorkspace; zeroed once), sized at
  // construction for the row counts up to max_rows; a call whose shape needs more runs unsplit.
  void* gemm_ws_ = nullptr;
  int64_t gemm_ws_bytes_ = 0;
  // Forward: x8 [Mp, K] | xs row-major [Mp][K/128] (M not a multiple of 128 only) | sa M-major
  // [K/128][pad4(max)] (M a multiple of 128: also the backward's requantise input).
  uint8_t* x8_ = nullptr;
  float* xs_ = nullptr;
  float* sa_ = nullptr;
  // Backward: dy padded [Mp, N] BF16 | dy8 [max, Np] | sdy [Np/128][pad4(max)] | dyt [N, Mp]
  // | sdyt [Mp/128][pad4(N)] | xt [K, Mp] | sxt [Mp/128][pad4(K)].
  bf16* dy_pad_ = nullptr;
  uint8_t* dy8_ = nullptr;
  float* sdy_ = nullptr;
  uint8_t* dyt_ = nullptr;
  float* sdyt_ = nullptr;
  uint8_t* xt_ = nullptr;
  float* sxt_ = nullptr;
};

// The BF16 form (Precision::kBf16: operands rounded to BF16, FP32 accumulation, y and dx BF16,
// dW FP32 added), for the parts the recipe keeps out of FP8 (the output head, the gate's
// logits' projection when BF16 is wanted, and BF16 baselines): cuBLASLt's BF16 GEMMs, whose
// FP32 accumulation order differs from the CPU's (a stated tolerance, not bit equality). The
// weight's BF16 copy is refreshed from the FP32 master on the device. Device pointers, 16-byte
// aligned; no allocation per call (the cuBLASLt workspace is the layer's), capturable.
// Test: test_model_gpu --gtest_filter='LinearBf16Gpu*'.
class LinearBf16Gpu {
 public:
  LinearBf16Gpu(int64_t max_rows, int64_t n, int64_t k);
  ~LinearBf16Gpu();
  LinearBf16Gpu(const LinearBf16Gpu&) = delete;
  LinearBf16Gpu& operator=(const LinearBf16Gpu&) = delete;

  // W's BF16 copy (round to nearest even) from the FP32 master [N, K] on the device.
  void refresh_weight(const float* master, cudaStream_t stream);
  const bf16* weight() const { return w_; }
  // Use `owner`'s BF16 weight (same N, K) from now on, and free this one's: several uses of one
  // weight (the output head of the main model and of each MTP depth) keep one copy, refreshed
  // through the owner (refresh_weight here then throws). The owner must outlive this one.
  void share_weight(const LinearBf16Gpu& owner);
  // x [M, K] -> y [M, N]; remembers x (the caller keeps it unchanged until backward()).
  void forward(const bf16* x, int64_t m, bf16* y, cudaStream_t stream);
  // dy [M, N] -> dx [M, K] (null: none) and dw [N, K] FP32 += dy^T x (= with kOverwrite).
  void backward(const bf16* dy, bf16* dx, float* dw, cudaStream_t stream,
                kernels::WgradOutput dw_output = kernels::WgradOutput::kAccumulate);

 private:
  struct Plans;
  int64_t max_rows_ = 0, n_ = 0, k_ = 0, m_ = -1;
  const bf16* x_ = nullptr;
  bf16* w_ = nullptr;
  bool owns_weight_ = true;
  void* workspace_ = nullptr;
  void* handle_ = nullptr;  // cublasLtHandle_t
  std::unique_ptr<Plans> plans_;
};

}  // namespace fp8moe
