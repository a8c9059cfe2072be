// The routed + shared MoE layer on the CPU (see fp8moe/comm/moe_layer_reference.h): the existing
// references composed in the GPU layer's order. Test: build-*/tests/test_comm
// --gtest_filter='MoeLayerApi*'.
#include "fp8moe/comm/moe_layer_reference.h"

#include <string>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm {

void validate_moe_layer(const EpConfig& cfg, const FfnDims& routed, const FfnDims& shared,
                        const char* who) {
  validate(cfg);
  FM_CHECK_ARG(cfg.payload == Payload::kFP8, who, ": the layer needs the FP8 payload, config has ",
               payload_name(cfg.payload));
  FM_CHECK_ARG(cfg.masked_capacity == 0, who, ": the layer runs the grouped layout, config has ",
               "masked_capacity=", cfg.masked_capacity);
  FM_CHECK_ARG(routed.groups == cfg.experts_per_rank(), who, ": routed weights hold ",
               routed.groups, " experts, the rank owns experts_per_rank=", cfg.experts_per_rank());
  FM_CHECK_ARG(routed.hidden == cfg.hidden, who, ": routed weights have hidden=", routed.hidden,
               ", config hidden=", cfg.hidden);
  FM_CHECK_ARG(shared.groups == 1, who, ": the shared expert's weights hold ", shared.groups,
               " groups, must be 1");
  FM_CHECK_ARG(shared.hidden == cfg.hidden, who, ": shared weights have hidden=", shared.hidden,
               ", config hidden=", cfg.hidden);
  FM_CHECK_ARG(routed.inter > 0 && routed.inter % 128 == 0, who, ": routed inter=", routed.inter,
               " is not a positive multiple of 128");
  FM_CHECK_ARG(shared.inter > 0 && shared.inter % 128 == 0, who, ": shared inter=", shared.inter,
               " is not a positive multiple of 128");
}

void add_bf16_reference(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = float_to_bf16_bits(bf16_bits_to_float(a[i]) + bf16_bits_to_float(b[i]));
}

MoeLayerReference moe_layer_reference(const EpConfig& cfg, const std::vector<TokenBatch>& batches,
                                      const std::vector<const ExpertWeightsHost*>& routed,
                                      const std::vector<const ExpertWeightsHost*>& shared,
                                      bool pow2_scales, int threads) {
  const int R = cfg.num_ranks;
  FM_CHECK_ARG(static_cast<int>(batches.size()) == R && static_cast<int>(routed.size()) == R &&
                   static_cast<int>(shared.size()) == R,
               "moe_layer_reference: ", batches.size(), " batches, ", routed.size(), " routed and ",
               shared.size(), " shared weight sets for num_ranks=", R);
  for (int r = 0; r < R; ++r) {
    FM_CHECK_ARG(routed[r] != nullptr && shared[r] != nullptr,
                 "moe_layer_reference: null weights of rank ", r);
    const std::string who = "moe_layer_reference rank " + std::to_string(r);
    validate_moe_layer(cfg, {routed[r]->groups, routed[r]->hidden, routed[r]->inter},
                       {shared[r]->groups, shared[r]->hidden, shared[r]->inter}, who.c_str());
  }
  const int64_t H = cfg.hidden, KB = H / 128, bound = cfg.row_bound();
  MoeLayerReference out;

  // 1. Routed: dispatch, each rank's local experts on its grouped rows, combine.
  out.dispatched = dispatch_reference(cfg, batches);
  out.expert_rows.resize(R);
  std::vector<const uint16_t*> rows(R);
  for (int d = 0; d < R; ++d) {
    const GroupedRecv& g = out.dispatched[d].grouped;
    FM_CHECK_ARG(!g.overflow, "moe_layer_reference: rank ", d, " needs ", g.rows_needed,
                 " grouped rows, the bound is ", bound);
    out.expert_rows[d].assign(bound * H, 0);  // padding rows stay 0
    Fp8MatrixRef a;
    a.codes = g.x_fp8.data();
    a.rows = bound;
    a.cols = H;
    a.ld = H;
    a.scales = g.x_scales.data();
    a.granularity = ScaleGranularity::k1x128;
    a.scale_row_stride = KB;
    a.scale_col_stride = 1;
    expert_ffn_reference(a, g.m_indices.data(), *routed[d], nullptr, pow2_scales,
                         reinterpret_cast<bf16*>(out.expert_rows[d].data()), {}, threads);
    rows[d] = out.expert_rows[d].data();
  }
  out.routed_out = combine_reference(cfg, out.dispatched, rows);

  // 2. Shared: every token of the rank through its shared expert (one group).
  // 3. y = bf16(routed + shared).
  out.shared_out.resize(R);
  out.y.resize(R);
  for (int s = 0; s < R; ++s) {
    const int64_t T = batches[s].tokens;
    std::vector<uint8_t> codes(T * H);
    std::vector<float> scales(T * KB);
    for (int64_t t = 0; t < T; ++t)
      quantize_row_fp8(batches[s].x + t * H, H, codes.data() + t * H, scales.data() + t * KB);
    const std::vector<int32_t> layout(T, 0);
    out.shared_out[s].assign(T * H, 0);
    Fp8MatrixRef a;
    a.codes = codes.data();
    a.rows = T;
    a.cols = H;
    a.ld = H;
    a.scales = scales.data();
    a.granularity = ScaleGranularity::k1x128;
    a.scale_row_stride = KB;
    a.scale_col_stride = 1;
    expert_ffn_reference(a, layout.data(), *shared[s], nullptr, pow2_scales,
                         reinterpret_cast<bf16*>(out.shared_out[s].data()), {}, threads);
    out.y[s].resize(T * H);
    add_bf16_reference(out.routed_out[s].data(), out.shared_out[s].data(), T * H, out.y[s].data());
  }
  return out;
}

}  // namespace fp8moe::comm
