// One routed + shared MoE FFN layer across EP ranks on the CPU: the reference that defines what
// MoeLayerGpu (fp8moe/comm/moe_layer_gpu.h) computes, composed from the existing references in
// the order the GPU runs them. For each rank s with tokens x_s [T_s, H] (BF16), topk ids / weights:
//   1. routed: dispatch_reference (FP8 1x128 at the sender) -> on every rank d the local experts'
//      FFN expert_ffn_reference over d's grouped rows (x_fp8, x_scales; m_indices as the layout)
//      -> combine_reference (gate weights, FP32 sums, BF16 out): routed_s [T_s, H] BF16;
//   2. shared: x_s quantised 1x128 with quantize_row_fp8 (the dispatch's formula, never pow2),
//      then expert_ffn_reference with one group, every row's expert 0: shared_s [T_s, H] BF16;
//   3. y_s[t, h] = bf16(float(routed_s[t, h]) + float(shared_s[t, h])) (one FP32 add, rounded to
//      nearest even: the GPU's add kernel does the same, so this step is exact).
// pow2_scales: the FFNs' activation (h) scales as ExpertFfnOptions::pow2_scales.
// Tests: tests/comm/moe_layer_api_test.cpp (against a plain FP32 MoE; build-*/tests/test_comm
// --gtest_filter='MoeLayerApi*') and, the GPU layer against it,
// tests/comm/moe_layer_api_gpu_test.cu.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "fp8moe/comm/ep.h"
#include "fp8moe/moe/expert_ffn_reference.h"

namespace fp8moe::comm {

// The dimensions of one FFN weight set (ExpertWeightsHost / ExpertWeightsGpu carry the same).
struct FfnDims {
  int64_t groups = 0, hidden = 0, inter = 0;
};

// kInvalidArgument naming the value unless the layer's pieces fit together: the config valid
// (validate()), FP8 payload, routed.groups ==
// experts_per_rank, routed.hidden == shared.hidden == cfg.hidden, shared.groups == 1, both inter
// positive multiples of 128. `who` prefixes the message (e.g. "MoeLayerGpu rank 1").
void validate_moe_layer(const EpConfig& cfg, const FfnDims& routed, const FfnDims& shared,
                        const char* who);

// The layer's pieces per rank (host memory): routed_out (step 1), shared_out (step 2), y (3).
struct MoeLayerReference {
  std::vector<DispatchResult> dispatched;
  std::vector<std::vector<uint16_t>> expert_rows;  // [R][row bound * H] rank d's expert outputs
  std::vector<std::vector<uint16_t>> routed_out;   // [R][T_s * H]
  std::vector<std::vector<uint16_t>> shared_out;   // [R][T_s * H]
  std::vector<std::vector<uint16_t>> y;            // [R][T_s * H]
};

// batches[s]: rank s's tokens (TokenBatch, host); routed[d]: rank d's local experts
// (groups = experts_per_rank); shared[s]: rank s's shared expert (groups = 1; the same weights
// on every rank in a model, but not required). threads: expert_ffn_reference's.
MoeLayerReference moe_layer_reference(const EpConfig& cfg, const std::vector<TokenBatch>& batches,
                                      const std::vector<const ExpertWeightsHost*>& routed,
                                      const std::vector<const ExpertWeightsHost*>& shared,
                                      bool pow2_scales, int threads = 1);

// ---- Backward (MoeLayerGpu::backward; docs/moe/README.md "MoeLayerGpu backward (s20-mb)") ----
// The forward's cached up-GEMM outputs (step 1 of expert_ffn_reference: x * w13[e]^T in
// gemm_fp8_reference, rounded to BF16) per rank: routed [row bound * 2 I_routed] in the
// dispatch's grouped layout (rows outside it 0), shared [pad128(T_s) * 2 I_shared] (rows past
// T_s 0). A GPU test may put the GPU's own gate_up here (MoeLayerGpu::routed_gate_up()).
struct MoeLayerGateUp {
  std::vector<std::vector<bf16>> routed, shared;
};
MoeLayerGateUp moe_layer_gate_up_reference(const EpConfig& cfg, const MoeLayerReference& fwd,
                                           const std::vector<TokenBatch>& batches,
                                           const std::vector<const ExpertWeightsHost*>& routed,
                                           const std::vector<const ExpertWeightsHost*>& shared,
                                           int threads = 1);

// The layer's backward per rank (host memory). Weight gradients start from 0 here (the GPU
// accumulates into the caller's: compare the increments).
struct MoeLayerBackward {
  std::vector<std::vector<uint16_t>> grad_rows;      // [R][bound * H] step 1's grad of expert rows
  std::vector<std::vector<uint16_t>> dx_rows;        // [R][bound * H] step 2's dx (others 0)
  std::vector<std::vector<uint16_t>> token_rows;     // [R][R * Tmax * H] step 3's per-slot rows
  std::vector<std::vector<uint16_t>> grad_x_routed;  // [R][T_s * H] step 3
  std::vector<std::vector<uint16_t>> grad_x_shared;  // [R][T_s * H] step 4
  std::vector<std::vector<uint16_t>> grad_x;         // [R][T_s * H] step 5
  std::vector<std::vector<float>> grad_topk_w;       // [R][T_s * K] step 1
  std::vector<std::vector<float>> routed_dw13, routed_dw2;  // [R][G*2I*H], [R][G*H*I]
  std::vector<std::vector<float>> shared_dw13, shared_dw2;  // [R][2Is*H], [R][H*Is]
};
// The gradients of the layer for output gradients grad_y[s] ([T_s, H] BF16 at every rank s),
// with every FP8 quantisation and BF16 rounding of the forward straight-through, composed from
// the existing references in MoeLayerGpu's order:
//   1. combine_backward_reference(dispatched, grad_y, fwd.expert_rows): grad_rows[d] (the
//      routed experts' output gradients in d's grouped layout) and grad_topk_w[s] (the gate
//      weights' gradients: the gate weights act in the combine only, so the FFN rows get no
//      row_scale and no d_row_scale);
//   2. on every rank d, expert_ffn_backward_reference over its first expert_offsets[L] grouped
//      rows (the dispatch's FP8 rows, expert_rows[e] = expert_offsets[e + 1] - expert_offsets[e],
//      gate_up.routed[d], dy = grad_rows[d]): dx_rows[d], routed_dw13[d], routed_dw2[d];
//   3. dispatch's backward: token_rows[d][s * Tmax + j] = bf16(sum over k ascending of the
//      token's rows on d (GroupedRecv::token_rows) of float(dx_rows[d][row]), from +0.0f, never
//      fused), then grad_x_routed = combine_tokens_reference(token_rows);
//   4. shared: x_s quantised as the forward (quantize_row_fp8), padded to pad128(T_s) rows
//      (layout 0 on the T_s rows, -1 after; expert_rows {pad128(T_s)}), gate_up.shared[s],
//      dy = grad_y[s] (y = routed + shared: both get grad_y whole): grad_x_shared[s],
//      shared_dw13[s], shared_dw2[s];
//   5. grad_x[s] = bf16(float(grad_x_routed[s]) + float(grad_x_shared[s])) (add_bf16_reference:
//      one FP32 add, round to nearest even; MoeLayerGpu's add_bf16 is the same, bit for bit).
// fwd: moe_layer_reference's result for the same batches (its dispatched and expert_rows are
// read; a GPU test may put the GPU's expert rows in expert_rows). kInvalidArgument for sizes
// that do not fit (naming the rank).
MoeLayerBackward moe_layer_backward_reference(const EpConfig& cfg,
                                              const std::vector<TokenBatch>& batches,
                                              const std::vector<const ExpertWeightsHost*>& routed,
                                              const std::vector<const ExpertWeightsHost*>& shared,
                                              const MoeLayerReference& fwd,
                                              const MoeLayerGateUp& gate_up,
                                              const std::vector<std::span<const uint16_t>>& grad_y,
                                              bool pow2_scales, int threads = 1);

// Step 5 alone (and the forward's step 3): y = bf16(float(a) + float(b)) element-wise over n
// BF16 values.
void add_bf16_reference(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* y);

}  // namespace fp8moe::comm
