// One routed + shared MoE FFN layer of a DeepSeek-V3-style model on one EP rank, as a library call
// (each rank of the group calls forward with its own tokens):
//   dispatch   DeviceEpRank::dispatch_send + dispatch_recv (FP8 1x128 at the sender);
//   experts    the local routed experts: ExpertFfnGpu on the received rows, gathered from the
//              records (DeviceEpOptions::expand_payload off: forward_gathered, scales by
//              gather_scales_to_mn_major) or on the expanded rows (on: forward_contiguous, scales
//              by scales_to_mn_major), m_indices as the grouped layout; with a masked config
//              (EpConfig::masked_capacity > 0: the low-latency kernels, decoding) on the masked
//              layout (forward_masked, expert_counts as masked_m, scales by scales_to_mn_major per
//              expert; the GEMMs' tiles chosen for ranks x T x top_k / experts rows an expert,
//              not the worst-case capacity); and the shared expert:
//              x quantised 1x128 (kernels::quantize_1x128, the dispatch's formula), ExpertFfnGpu
//              with one group over the T tokens padded to 128 (grouped layout 0 on the T
//              rows, -1 on the padding);
//   combine    DeviceEpRank::combine_send + combine_recv (gate weights, FP32 sums) into y, then
//              y = bf16(float(y) + float(shared)) (one FP32 add, round to nearest even).
// Reference: moe_layer_reference (fp8moe/comm/moe_layer_reference.h), the same composition on
// the CPU; the routed and shared FFNs equal it up to ExpertFfnGpu's tensor-core summation, the
// combine and the add bit for bit on the GPU's FFN outputs; the gathered, expanded and masked
// paths are equal bit for bit (a masked layer's y is the grouped layer's). The masked form is
// forward only (MoeLayerOptions::backward is refused). Test: build-*/tests/test_comm_gpu
// --gtest_filter='MoeLayerApi*'.
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

// Masked configs: how the routed experts' GEMMs read the masked layout.
//   kMaskedGemm      the masked grouped GEMMs (masked_m = expert_counts, the tiles chosen for the
//                    expected rows an expert, only the groups' real tiles walked);
//   kContiguousGemm  the grouped-contiguous GEMMs over the layout's row index (m_indices: expert
//                    e's rows at e * capacity, the rest padding, whole 128-row padding blocks
//                    skipped); needs the capacity a multiple of 128. Slower: 0.73-1.00x the
//                    masked GEMMs' layer on 2 x H200 (docs/results/moe-decode-2026-11-27-2xh200.md:
//                    the padding blocks between experts leave the persistent grid's CTAs uneven
//                    work); kept as the cross-check the test runs;
//   kAuto            kMaskedGemm.
// The same bits every way.
enum class MaskedExperts { kAuto, kMaskedGemm, kContiguousGemm };

struct MoeLayerOptions {
  bool pow2_scales = false;  // the FFNs' h scales (ExpertFfnOptions::pow2_scales)
  MaskedExperts masked_experts = MaskedExperts::kAuto;
  // Allocate the backward's workspaces (the FFNs' ExpertFfnOptions::backward and the layer's
  // own; docs/moe/README.md "MoeLayerGpu backward (s20-mb)" gives the memory) so that backward()
  // may follow each forward. Needs both weight sets uploaded with_transposed (thrown at
  // construction otherwise). The forward runs the same kernels either way.
  bool backward = false;
  // How the backward's experts learn their row counts. false (default): from the dispatch's
  // layout on the device (the k-grouped wgrads' device-layout form) — no host synchronisation, so
  // a whole layer's forward and backward are capturable in a CUDA graph; the routed FFN's
  // memory-bound steps then run over the row bound rounded down to 128 (padding rows zeroed, the
  // GEMMs skip them). true: the counts copied to the host with one wait per layer backward (not
  // capturable); those steps run over the received rows only — faster when the bound is loose.
  // Both give the same bits.
  bool backward_host_counts = false;
};

// The weight gradients backward() ACCUMULATES into (+=; FP32, device pointers on the rank's
// device, ExpertWeightsHost's layouts): the routed experts' dW13 [G][2I][H] and dW2 [G][H][I],
// the shared expert's [2Is][H] and [H][Is].
struct MoeLayerGrads {
  float* routed_dw13 = nullptr;
  float* routed_dw2 = nullptr;
  float* shared_dw13 = nullptr;
  float* shared_dw2 = nullptr;
  // Write the gradients over the arrays instead of adding (the first micro-batch of a step: no
  // zeroing beforehand, half the FP32 traffic; experts that received no rows get zeros).
  bool overwrite = false;
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

  // The backward of the last forward (MoeLayerOptions::backward), moe_layer_backward_reference
  // step by step (every FP8 quantisation and BF16 rounding of the forward straight-through):
  //   combine_backward   DeviceEpRank::combine_backward_send + _recv: grad_y [T, H] BF16 ->
  //                      the expert rows' gradients (this rank's grouped rows) and grad_topk_w
  //                      [T, K] float (the gate weights act in the combine only, so the FFN rows
  //                      take no row_scale); also copies the layout's expert offsets to the host;
  //   experts_backward   waits for that copy (ONE host synchronisation per layer backward, on an
  //                      event recorded on the stream before the combine backward: so not
  //                      capturable in a CUDA graph yet; the next step is a k-grouped wgrad that
  //                      reads device counts), then ExpertFfnGpu::backward_contiguous of the
  //                      routed experts on the received rows (expanded path: the EP rank's rows;
  //                      gathered path: the records gathered into a contiguous copy first) and of
  //                      the shared expert on the T rows (dy = grad_y);
  //   dispatch_backward  each received token's rows summed in FP32 (k ascending, one BF16
  //                      rounding) -> DeviceEpRank::combine_tokens_send + combine_recv into
  //                      grad_x, then grad_x = bf16(float(grad_x) + float(shared dx)) (add_bf16).
  // backward() is the three. Ranks sharing a GPU run them phase by phase across ranks, as the
  // forward's. Order: forward (or its phases, combine last), then combine_backward,
  // experts_backward, dispatch_backward, once; anything else throws kInvalidArgument. The EP
  // rank's last dispatch must be this forward's (no rank of the group may dispatch on it between
  // the forward and the backward: the received rows, the layout and the handle are the EP
  // rank's). grad_y must stay unchanged until experts_backward has run; grad_x [T, H] BF16 and
  // grad_topk_w [T, K] float are written (all T rows; a dropped slot's grad_topk_w is +0).
  // Pointers: device, on the rank's device, 16-byte aligned.
  void backward(const bf16* grad_y, bf16* grad_x, float* grad_topk_w, const MoeLayerGrads& grads,
                cudaStream_t stream);
  void combine_backward(const bf16* grad_y, float* grad_topk_w, cudaStream_t stream);
  void experts_backward(const MoeLayerGrads& grads, cudaStream_t stream);
  void dispatch_backward(bf16* grad_x, cudaStream_t stream);

  // Another layer's weights for the following calls (the same groups, hidden and inter as the
  // constructor's; views kept, not copied): one MoeLayerGpu, its endpoint and its workspaces can
  // then serve every MoE layer of a model in turn, as the decoding path does (the layers run one
  // after the other; DeepEP's one buffer). Between forwards only (kInvalidArgument otherwise); a
  // pending backward is dropped.
  void set_weights(const ExpertWeightsGpu& routed, const ExpertWeightsGpu& shared);

  bool gathered() const { return gathered_; }
  bool masked() const { return masked_; }
  // Masked configs: the routed experts run the masked GEMMs (MaskedExperts, as resolved).
  bool masked_gemms() const { return masked_ && !masked_contiguous_; }
  DeviceEpRank& ep() { return ep_; }
  // The last forward's intermediates (tests): the routed experts' outputs [row bound, H] in the
  // dispatch's grouped (or masked) layout (padding rows untouched), and the shared expert's
  // [pad128(T), H] (rows past T unspecified: not written).
  const bf16* expert_rows() const { return expert_rows_; }
  const bf16* shared_out() const { return shared_out_; }
  // The forward's cached up-GEMM outputs the backward reads (tests): routed [row bound, 2I] in
  // the grouped layout, shared [pad128(T), 2Is] (rows past T not written). The backward's
  // intermediates: the expert rows' gradients [row bound, H] (combine_backward) and the routed
  // dx rows [row bound, H] (experts_backward; rows outside the layout unspecified), the shared
  // expert's dx [pad128(T), H] (rows past T unspecified); null without
  // MoeLayerOptions::backward.
  const bf16* routed_gate_up() const { return routed_ffn_->gate_up(); }
  const bf16* shared_gate_up() const { return shared_ffn_ ? shared_ffn_->gate_up() : nullptr; }
  const bf16* grad_rows() const { return grad_rows_; }
  const bf16* dx_rows() const { return dx_rows_; }
  const bf16* shared_dx() const { return shared_dx_; }

 private:
  enum class Phase { kIdle, kDispatched, kExperts };
  void allocate_backward();
  DeviceEpRank& ep_;
  ExpertWeightsGpu routed_, shared_;
  MoeLayerOptions options_;
  bool gathered_ = false, masked_ = false, masked_contiguous_ = false;
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
  // Backward (MoeLayerOptions::backward): one allocation of grad_rows [bound, H] BF16 | dx_rows
  // [bound, H] BF16 | x_rows [bound, H] E4M3 (gathered path only) | token_rows [R * Tmax, H]
  // BF16 | row_of [R * Tmax * K] int32 | shared_dx [S, H] BF16 | bwd_sa; the host copy of the
  // expert offsets (pinned) and its event.
  enum class BwdPhase { kNone, kReady, kCombined, kExperts };
  void* bwd_buffer_ = nullptr;
  bf16* grad_rows_ = nullptr;
  bf16* dx_rows_ = nullptr;
  uint8_t* x_rows_ = nullptr;
  bf16* token_rows_ = nullptr;
  int32_t* row_of_ = nullptr;
  bf16* shared_dx_ = nullptr;
  float* bwd_sa_ = nullptr;  // [H/128][pad(bound)]: the forward's A scales for the used rows
  int32_t* host_offsets_ = nullptr;
  cudaEvent_t offsets_ready_ = nullptr;
  const bf16* grad_y_ = nullptr;
  BwdPhase bwd_phase_ = BwdPhase::kNone;
};

// y[i] = bf16(float(a[i]) + float(b[i])) for i < n (device pointers, 16-byte aligned;
// y may be a). Stream-ordered, capturable. add_bf16_reference is its reference.
void add_bf16(const bf16* a, const bf16* b, int64_t n, bf16* y, cudaStream_t stream);

}  // namespace fp8moe::comm
