// The routed experts' FP8 FFN on the GPU as one call, on the grouped layouts the EP dispatch
// produces: y = down(silu(x W_gate^T) * (x W_up^T)) with each row's expert, as
//   1. up GEMM     gate_up [rows, 2I] BF16 = x [rows, H] * w13[e]^T   (grouped FP8 GEMM, N = 2I)
//   2. activation  h codes [rows, I] + 1x128 scales M-major = kernels::swiglu_quantize_1x128
//                  (row_scale applied when given; pow2 scales per ExpertFfnOptions)
//   3. down GEMM   y [rows, H] BF16 = h * w2[e]^T                      (grouped FP8 GEMM, K = I)
// Reference: expert_ffn_reference (moe/expert_ffn_reference.h), which this equals up to the FP32
// summation order inside the tensor cores' 128-wide K windows (and what that moves across BF16 /
// E4M3 rounding boundaries). Test: build/tests/test_moe_gpu --gtest_filter='ExpertFfn*'.
//
// Forms (fp8_gemm.h gives the layouts in full; pad(x) = padded_rows(x), x rounded up to 4):
//   contiguous  x [rows, H] E4M3, sa [H/128][pad(rows)] (M-major), grouped_layout [rows]
//               (expert per row, -1 for padding; each expert's rows start at a multiple of 128,
//               rows a multiple of 128), y [rows, H];
//   gathered    the same with x's rows read through a row index (kernels::GatheredRows, e.g. the
//               EP dispatch's received records; sa from gather_scales_to_mn_major): bit for bit
//               the contiguous form on the materialised rows;
//   masked      x [G][max_m][H], sa [G][H/128][pad(max_m)], masked_m [G] (device: the valid rows
//               of each group, read on the device only), y [G][max_m][H].
// Padding rows of y (grouped_layout < 0; rows >= masked_m[g]) are left untouched: the GEMMs do not
// write them. row_scale (optional, FP32 [rows] or [G * max_m]) multiplies h per row (e.g. the
// router's weight, so that the combine can sum without weights).
// All pointers are device pointers on the device current when ExpertFfnGpu was constructed. Calls
// are stream-ordered, allocate nothing and are CUDA-graph capturable; one ExpertFfnGpu's calls
// share its workspace, so they must not run at the same time (one object per stream).
// Shapes it cannot take throw fp8moe::Error (kInvalidArgument) naming the problem before any
// launch: rows above max_rows, H or I not multiples of 128, weights of other dimensions, null
// pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "fp8moe/core/dtypes.h"
#include "fp8moe/fp8/quantize.h"
#include "fp8moe/kernels/fp8_gemm.h"
#include "fp8moe/moe/expert_ffn_reference.h"

namespace fp8moe {

// The experts' weights on the device (non-owning), layouts as ExpertWeightsHost:
// w13 [G][2I][H] (gate rows, then up rows), s13 [G][2I/128][H/128], w2 [G][H][I],
// s2 [G][H/128][I/128].
struct ExpertWeightsGpu {
  int64_t groups = 0, hidden = 0, inter = 0;
  const uint8_t* w13 = nullptr;
  const float* s13 = nullptr;
  const uint8_t* w2 = nullptr;
  const float* s2 = nullptr;
  // The transposes the backward reads (ExpertWeightsTransposedHost's layouts; null unless
  // uploaded with_transposed): w13t [G][H][2I], s13t [G][H/128][2I/128], w2t [G][I][H],
  // s2t [G][I/128][H/128].
  const uint8_t* w13t = nullptr;
  const float* s13t = nullptr;
  const uint8_t* w2t = nullptr;
  const float* s2t = nullptr;
};

// Owns a device copy of quantised expert weights (on the device current at construction).
class ExpertWeightsDevice {
 public:
  // Uploads (synchronous cudaMemcpy); with_transposed also uploads transpose_expert_weights(host)
  // (twice the memory; transposed on the host: a trainer whose weights change each step needs a
  // device transpose instead, not written yet).
  explicit ExpertWeightsDevice(const ExpertWeightsHost& host, bool with_transposed = false);
  // quantize_expert_weights (gate, up [G][I][H], down [G][H][I], FP32 host) then upload.
  ExpertWeightsDevice(const float* gate, const float* up, const float* down, int64_t groups,
                      int64_t hidden, int64_t inter, QuantizeOptions options = {},
                      bool with_transposed = false);
  ~ExpertWeightsDevice();
  ExpertWeightsDevice(const ExpertWeightsDevice&) = delete;
  ExpertWeightsDevice& operator=(const ExpertWeightsDevice&) = delete;
  ExpertWeightsDevice(ExpertWeightsDevice&& other) noexcept;
  ExpertWeightsDevice& operator=(ExpertWeightsDevice&& other) noexcept;

  const ExpertWeightsGpu& view() const { return view_; }

 private:
  void release();
  ExpertWeightsGpu view_;
  void* buffer_ = nullptr;  // one allocation: w13 | s13 | w2 | s2 [| w13t | s13t | w2t | s2t]
};

struct ExpertFfnOptions {
  bool pow2_scales = false;  // h's (and the backward's activations') 1x128 scales: powers of two
  bool backward = false;     // also allocate backward_contiguous's workspace
};

class ExpertFfnGpu {
 public:
  // Workspace for up to max_rows rows (contiguous / gathered: rows; masked: G * pad(max_m)):
  // gate_up BF16 [max_rows, 2I], h codes [max_rows, I], h scales [I/128][pad(max_rows)].
  ExpertFfnGpu(int64_t max_rows, int64_t hidden, int64_t inter, ExpertFfnOptions options = {});
  ~ExpertFfnGpu();
  ExpertFfnGpu(const ExpertFfnGpu&) = delete;
  ExpertFfnGpu& operator=(const ExpertFfnGpu&) = delete;

  // gate_up_out (optional, [rows, 2I] BF16, 16-byte aligned): the up GEMM writes there instead
  // of the workspace (the backward's cached activation; padding rows untouched); gate_up() then
  // does not hold this call's rows.
  void forward_contiguous(const uint8_t* x, const float* sa, const int32_t* grouped_layout,
                          int64_t rows, const ExpertWeightsGpu& weights, bf16* y,
                          cudaStream_t stream, const float* row_scale = nullptr,
                          bf16* gate_up_out = nullptr);
  void forward_gathered(kernels::GatheredRows x, const float* sa, const int32_t* grouped_layout,
                        int64_t rows, const ExpertWeightsGpu& weights, bf16* y, cudaStream_t stream,
                        const float* row_scale = nullptr);
  // expected_m: both GEMMs' tile-choice hint (kernels::fp8_gemm_nt_grouped_masked; 0: max_m).
  void forward_masked(const uint8_t* x, const float* sa, const int32_t* masked_m, int64_t max_m,
                      const ExpertWeightsGpu& weights, bf16* y, cudaStream_t stream,
                      const float* row_scale = nullptr, int64_t expected_m = 0);

  // The backward of forward_contiguous (expert_ffn_backward_reference gives it step by step):
  //   dy [rows, H] -> (padding rows zeroed) FP8 1x128 along H and, transposed, along rows;
  //   dh = dy8 * w2t[e]^T; d_gate_up = swiglu_backward(gate_up, dh, row_scale) (+ d_row_scale);
  //   d_gate_up -> FP8 along 2I and transposed; dx = dgu8 * w13t[e]^T;
  //   dW2[e] += dy^T h (h recomputed by swiglu_quantize_1x128 from gate_up, then
  //   kernels::requantize_1x128_transpose); dW13[e] += d_gate_up^T x (x^T by the same requantise).
  // Inputs: x codes [rows, H] + sa [H/128][pad(rows)] (the forward's FP8 input; padding rows may
  // hold anything, NaN included), gate_up [rows, 2I] (forward_contiguous's gate_up_out), the
  // layout, expert_rows (HOST, one per expert: the rows of expert g are the next expert_rows[g],
  // in expert order, each a multiple of 128, summing to rows; grouped_layout must agree: not
  // checked on the device), dy [rows, H] (padding rows never read).
  // Outputs: dx [rows, H] BF16 (padding rows untouched), dw13 [G][2I][H] and dw2 [G][H][I] FP32
  // ACCUMULATED (+=; written over with dw_output kOverwrite: the first micro-batch, no zeroing
  // needed, experts with no rows get zeros), d_row_scale [rows] if not null (padding rows 0).
  // Needs ExpertFfnOptions::backward and weights uploaded with_transposed (thrown otherwise).
  // Uses the forward's h workspace: h_codes() / h_scales() hold the recomputed h afterwards.
  void backward_contiguous(const uint8_t* x, const float* sa, const bf16* gate_up,
                           const int32_t* grouped_layout, std::span<const int64_t> expert_rows,
                           int64_t rows, const ExpertWeightsGpu& weights, const bf16* dy, bf16* dx,
                           float* dw13, float* dw2, cudaStream_t stream,
                           const float* row_scale = nullptr, float* d_row_scale = nullptr,
                           kernels::WgradOutput dw_output = kernels::WgradOutput::kAccumulate);
  // The same with the experts' row ranges read from grouped_layout on the device (the k-grouped
  // wgrads' device-layout form): no host counts, so a layer's backward is capturable in a CUDA
  // graph with counts that change between replays. rows is then the bound (a multiple of 128;
  // 128-row blocks past the last expert's, layout -1, are skipped); the layout must be the
  // dispatch's: each expert's rows start at a multiple of 128, experts in increasing order.
  // Bit for bit the form above when expert_rows matches the layout.
  void backward_contiguous(const uint8_t* x, const float* sa, const bf16* gate_up,
                           const int32_t* grouped_layout, int64_t rows,
                           const ExpertWeightsGpu& weights, const bf16* dy, bf16* dx, float* dw13,
                           float* dw2, cudaStream_t stream, const float* row_scale = nullptr,
                           float* d_row_scale = nullptr,
                           kernels::WgradOutput dw_output = kernels::WgradOutput::kAccumulate);

  int64_t max_rows() const { return max_rows_; }
  int64_t hidden() const { return hidden_; }
  int64_t inter() const { return inter_; }
  // The last call's intermediates (for tests and a backward that reuses them): gate_up
  // [rows, 2I]; h codes [rows, I] and scales [I/128][pad(rows)] (masked: per group).
  const bf16* gate_up() const { return gate_up_; }
  const uint8_t* h_codes() const { return h_codes_; }
  const float* h_scales() const { return h_scales_; }

 private:
  void check_call(const char* what, int64_t rows, const ExpertWeightsGpu& weights, const void* sa,
                  const void* layout, const bf16* y) const;
  void activation_and_down(const bf16* gate_up, const int32_t* grouped_layout, int64_t rows,
                           const ExpertWeightsGpu& weights, bf16* y, cudaStream_t stream,
                           const float* row_scale);

  void allocate_backward();
  void backward(const uint8_t* x, const float* sa, const bf16* gate_up,
                const int32_t* grouped_layout, std::span<const int64_t> expert_rows, int64_t rows,
                const ExpertWeightsGpu& weights, const bf16* dy, bf16* dx, float* dw13, float* dw2,
                cudaStream_t stream, const float* row_scale, float* d_row_scale,
                kernels::WgradOutput dw_output);

  int64_t max_rows_ = 0, hidden_ = 0, inter_ = 0;
  ExpertFfnOptions options_;
  int device_ = 0;
  bf16* gate_up_ = nullptr;
  uint8_t* h_codes_ = nullptr;
  float* h_scales_ = nullptr;
  // Backward workspace (ExpertFfnOptions::backward), one allocation; R = max_rows rounded up to
  // 128: dy copy BF16 [R,H]; dy8 [R,H] + [H/128][pad R]; dyT [H,R] + [R/128][pad H]; dh BF16
  // [R,I]; dgu BF16 [R,2I]; dgu8 [R,2I] + [2I/128][pad R]; dguT [2I,R] + [R/128][pad 2I];
  // hT [I,R] + [R/128][pad I]; xT [H,R] + [R/128][pad H].
  void* bwd_ = nullptr;
  struct Backward {
    bf16 *dy = nullptr, *dh = nullptr, *dgu = nullptr;
    uint8_t *dy8 = nullptr, *dyt = nullptr, *dgu8 = nullptr, *dgut = nullptr, *ht = nullptr,
            *xt = nullptr;
    float *dy8_s = nullptr, *dyt_s = nullptr, *dgu8_s = nullptr, *dgut_s = nullptr, *ht_s = nullptr,
          *xt_s = nullptr;
  } b_;
};

}  // namespace fp8moe
