// One routed + shared MoE FFN layer of a DeepSeek-V3-style model on one EP rank, as a library call
// (each rank of the group calls forward with its own tokens):
//   dispatch   DeviceEpRank::dispatch_send + dispatch_recv (FP8 1x128 at the sender);
//   experts    the local routed experts: ExpertFfnGpu on the received rows, gathered from the
//              records (DeviceEpOptions::expand_payload off: forward_gathered, scales by
//              gather_scales_to_mn_major) or on the expanded rows (on: forward_contiguous, scales
//              by scales_to_mn_major), m_indices as the grouped layout; and the shared expert:
//              x quantised 1x128 (kernels::quantize_1x128, the dispatch's formula), ExpertFfnGpu
//              with one group over the T tokens padded to 128 (grouped layout 0 on the T
//              rows, -1 on the padding);
//   combine    DeviceEpRank::combine_send + combine_recv (gate weights, FP32 sums) into y, then
//              y = bf16(float(y) + float(shared)) (one FP32 add, round to nearest even).
// Reference: moe_layer_reference (fp8moe/comm/moe_layer_reference.h), the same composition on
// the CPU; the routed and shared FFNs equal it up to ExpertFfnGpu's tensor-core summation, the
// combine and the add bit for bit on the GPU's FFN outputs; the gathered and expanded paths are
// equal bit for bit. Test: build-*/tests/test_comm_gpu --gtest_filter='MoeLayerApi*'.
//
// Every call only enqueues work on the given stream (no host synchronisation, no allocation), so
// a whole forward is capturable in a CUDA graph, as the EP ops are (one GPU per rank: a graph
// that spins in a receive while the peer's GEMM needs its SMs is not for ranks sharing a GPU).
// Ranks sharing a GPU run the three phases phase by phase across ranks (dispatch on every rank,
// then experts, then combine), as the EP tests do. The phases: dispatch() then experts() then
// combine() (forward() is the three); out of that order throws kInvalidArgument.
// Buffers: x, y [T, H] BF16, topk_idx int32 [T, K], topk_w float [T, K] (the router's, e.g.
// fp8moe/moe/router_cuda.h), device pointers on the rank's device, 16-byte aligned; x must stay
// unchanged until experts() has run, y is written by combine(). The weights are not owned: the
// ExpertWeightsGpu views must stay valid while the layer is used.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "fp8moe/comm/device_ep.h"
#include "fp8moe/comm/moe_layer_reference.h"
#include "fp8moe/core/dtypes.h"
#include "fp8moe/moe/expert_ffn_gpu.h"

namespace fp8moe::comm {

struct MoeLayerOptions {
  bool pow2_scales = false;  // the FFNs' h scales (ExpertFfnOptions::pow2_scales)
};

class MoeLayerGpu {
 public:
  // ep: this rank's EP endpoint (its config, device and path: view().row_record non-null means
  // the gathered path); routed: the rank's experts_per_rank experts; shared: one group. Both
  // hidden = the config's. Allocates its workspaces on ep.device(). Throws kInvalidArgument as
  // validate_moe_layer.
  MoeLayerGpu(DeviceEpRank& ep, const ExpertWeightsGpu& routed, const ExpertWeightsGpu& shared,
              MoeLayerOptions options = {});
  ~MoeLayerGpu();
  MoeLayerGpu(const MoeLayerGpu&) = delete;
  MoeLayerGpu& operator=(const MoeLayerGpu&) = delete;

  // tokens <= max_tokens_per_rank (0 allowed: the rank still takes part in the exchange); no
  // pointer may be null (with 0 tokens too).
  void forward(const bf16* x, const int32_t* topk_idx, const float* topk_w, int64_t tokens, bf16* y,
               cudaStream_t stream);
  void dispatch(const bf16* x, const int32_t* topk_idx, const float* topk_w, int64_t tokens,
                cudaStream_t stream);
  void experts(cudaStream_t stream);
  void combine(bf16* y, cudaStream_t stream);

  bool gathered() const { return gathered_; }
  DeviceEpRank& ep() { return ep_; }
  // The last forward's intermediates (tests): the routed experts' outputs [row bound, H] in the
  // dispatch's grouped layout (padding rows untouched), and the shared expert's [pad128(T), H]
  // (rows past T unspecified: not written).
  const bf16* expert_rows() const { return expert_rows_; }
  const bf16* shared_out() const { return shared_out_; }

 private:
  enum class Phase { kIdle, kDispatched, kExperts };
  DeviceEpRank& ep_;
  ExpertWeightsGpu routed_, shared_;
  MoeLayerOptions options_;
  bool gathered_ = false;
  int device_ = 0;
  int64_t hidden_ = 0, bound_ = 0, max_tokens_ = 0, shared_rows_ = 0;
  std::unique_ptr<ExpertFfnGpu> routed_ffn_, shared_ffn_;
  // One allocation: routed sa [H/128][pad(bound)] | expert_rows [bound, H] | shared x codes
  // [S, H] | shared scales row-major [S, H/128] | shared sa [H/128][S] | shared layout [S]
  // | shared_out [S, H], S = max_tokens_per_rank rounded up to 128.
  void* buffer_ = nullptr;
  float* routed_sa_ = nullptr;
  bf16* expert_rows_ = nullptr;
  uint8_t* shared_x_ = nullptr;
  float* shared_scales_ = nullptr;
  float* shared_sa_ = nullptr;
  int32_t* shared_layout_ = nullptr;
  bf16* shared_out_ = nullptr;
  const bf16* x_ = nullptr;
  int64_t tokens_ = 0;
  Phase phase_ = Phase::kIdle;
};

// y[i] = bf16(float(a[i]) + float(b[i])) for i < n (device pointers, 16-byte aligned;
// y may be a). Stream-ordered, capturable. add_bf16_reference is its reference.
void add_bf16(const bf16* a, const bf16* b, int64_t n, bf16* y, cudaStream_t stream);

}  // namespace fp8moe::comm
