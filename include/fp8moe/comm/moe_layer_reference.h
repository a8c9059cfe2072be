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
#include <vector>

#include "fp8moe/comm/ep.h"
#include "fp8moe/moe/expert_ffn_reference.h"

namespace fp8moe::comm {

// The dimensions of one FFN weight set (ExpertWeightsHost / ExpertWeightsGpu carry the same).
struct FfnDims {
  int64_t groups = 0, hidden = 0, inter = 0;
};

// kInvalidArgument naming the value unless the layer's pieces fit together: the config valid
// (validate()), FP8 payload, the grouped layout (masked_capacity 0), routed.groups ==
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

// Step 3 alone: y = bf16(float(a) + float(b)) element-wise over n BF16 values.
void add_bf16_reference(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* y);

}  // namespace fp8moe::comm
