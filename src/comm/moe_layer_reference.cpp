// The routed + shared MoE layer on the CPU (see fp8moe/comm/moe_layer_reference.h): the existing
// references composed in the GPU layer's order. Test: build-*/tests/test_comm
// --gtest_filter='MoeLayerApi*'.
#include "fp8moe/comm/moe_layer_reference.h"

#include <algorithm>
#include <string>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm {

void validate_moe_layer(const EpConfig& cfg, const FfnDims& routed, const FfnDims& shared,
                        const char* who) {
  validate(cfg);
  FM_CHECK_ARG(cfg.payload == Payload::kFP8, who, ": the layer needs the FP8 payload, config has ",
               payload_name(cfg.payload));
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

  // 1. Routed: dispatch, each rank's local experts on its grouped (or masked) rows, combine.
  out.dispatched = dispatch_reference(cfg, batches);
  out.expert_rows.resize(R);
  std::vector<const uint16_t*> rows(R);
  for (int d = 0; d < R; ++d) {
    const GroupedRecv& g = out.dispatched[d].grouped;
    FM_CHECK_ARG(!g.overflow, "moe_layer_reference: rank ", d, " needs ", g.rows_needed,
                 " grouped rows, the bound is ", bound);
    out.expert_rows[d].assign(bound * H, 0);  // padding rows stay 0
    const Fp8MatrixRef a =
        fp8_matrix_ref(g.x_fp8.data(), g.x_scales.data(), bound, H, ScaleGranularity::k1x128);
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
    const Fp8MatrixRef a =
        fp8_matrix_ref(codes.data(), scales.data(), T, H, ScaleGranularity::k1x128);
    expert_ffn_reference(a, layout.data(), *shared[s], nullptr, pow2_scales,
                         reinterpret_cast<bf16*>(out.shared_out[s].data()), {}, threads);
    out.y[s].resize(T * H);
    add_bf16_reference(out.routed_out[s].data(), out.shared_out[s].data(), T * H, out.y[s].data());
  }
  return out;
}

namespace {

int64_t pad128(int64_t n) {
  return (n + 127) / 128 * 128;
}

// Rank s's tokens quantised as the forward's shared expert reads them, padded to pad128(T) rows
// (codes and scales 0 there).
void shared_input(const TokenBatch& b, int64_t H, std::vector<uint8_t>& codes,
                  std::vector<float>& scales) {
  const int64_t rows = pad128(b.tokens), KB = H / 128;
  codes.assign(rows * H, 0);
  scales.assign(rows * KB, 0.0f);
  for (int64_t t = 0; t < b.tokens; ++t)
    quantize_row_fp8(b.x + t * H, H, codes.data() + t * H, scales.data() + t * KB);
}

void check_ranks(const EpConfig& cfg, const std::vector<TokenBatch>& batches,
                 const std::vector<const ExpertWeightsHost*>& routed,
                 const std::vector<const ExpertWeightsHost*>& shared, const MoeLayerReference& fwd,
                 const char* who) {
  const int R = cfg.num_ranks;
  FM_CHECK_ARG(static_cast<int>(batches.size()) == R && static_cast<int>(routed.size()) == R &&
                   static_cast<int>(shared.size()) == R &&
                   static_cast<int>(fwd.dispatched.size()) == R &&
                   static_cast<int>(fwd.expert_rows.size()) == R,
               who, ": ", batches.size(), " batches, ", routed.size(), " routed and ",
               shared.size(), " shared weight sets, ", fwd.dispatched.size(), " dispatch results, ",
               fwd.expert_rows.size(), " expert row sets for num_ranks=", R);
  for (int r = 0; r < R; ++r) {
    FM_CHECK_ARG(routed[r] != nullptr && shared[r] != nullptr, who, ": null weights of rank ", r);
    const std::string w = std::string(who) + " rank " + std::to_string(r);
    validate_moe_layer(cfg, {routed[r]->groups, routed[r]->hidden, routed[r]->inter},
                       {shared[r]->groups, shared[r]->hidden, shared[r]->inter}, w.c_str());
    FM_CHECK_ARG(
        cfg.masked_capacity == 0, who,
        ": the backward runs the grouped layout, config has masked_capacity=", cfg.masked_capacity);
    FM_CHECK_ARG(!fwd.dispatched[r].grouped.overflow, who, ": rank ", r,
                 " overflowed its row bound");
    FM_CHECK_ARG(fwd.dispatched[r].handle.tokens == batches[r].tokens, who, ": rank ", r,
                 " dispatched ", fwd.dispatched[r].handle.tokens, " tokens, its batch has ",
                 batches[r].tokens);
  }
}

}  // namespace

MoeLayerGateUp moe_layer_gate_up_reference(const EpConfig& cfg, const MoeLayerReference& fwd,
                                           const std::vector<TokenBatch>& batches,
                                           const std::vector<const ExpertWeightsHost*>& routed,
                                           const std::vector<const ExpertWeightsHost*>& shared,
                                           int threads) {
  check_ranks(cfg, batches, routed, shared, fwd, "moe_layer_gate_up_reference");
  const int R = cfg.num_ranks, L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden, KB = H / 128, bound = cfg.row_bound();
  MoeLayerGateUp out;
  out.routed.resize(R);
  out.shared.resize(R);
  for (int d = 0; d < R; ++d) {
    const GroupedRecv& g = fwd.dispatched[d].grouped;
    const int64_t I2 = 2 * routed[d]->inter;
    out.routed[d].assign(bound * I2, bf16{0});
    for (int e = 0; e < L; ++e) {
      const int64_t off = g.expert_offsets[e], n = g.expert_counts[e];
      if (n == 0) continue;
      gemm_fp8_reference_bf16(fp8_matrix_ref(g.x_fp8.data() + off * H, g.x_scales.data() + off * KB,
                                             n, H, ScaleGranularity::k1x128),
                              routed[d]->w13_ref(e), out.routed[d].data() + off * I2, I2, {},
                              threads);
    }
  }
  for (int s = 0; s < R; ++s) {
    const int64_t T = batches[s].tokens, I2 = 2 * shared[s]->inter;
    out.shared[s].assign(pad128(T) * I2, bf16{0});
    if (T == 0) continue;
    std::vector<uint8_t> codes;
    std::vector<float> scales;
    shared_input(batches[s], H, codes, scales);
    gemm_fp8_reference_bf16(
        fp8_matrix_ref(codes.data(), scales.data(), T, H, ScaleGranularity::k1x128),
        shared[s]->w13_ref(0), out.shared[s].data(), I2, {}, threads);
  }
  return out;
}

MoeLayerBackward moe_layer_backward_reference(const EpConfig& cfg,
                                              const std::vector<TokenBatch>& batches,
                                              const std::vector<const ExpertWeightsHost*>& routed,
                                              const std::vector<const ExpertWeightsHost*>& shared,
                                              const MoeLayerReference& fwd,
                                              const MoeLayerGateUp& gate_up,
                                              const std::vector<std::span<const uint16_t>>& grad_y,
                                              bool pow2_scales, int threads) {
  constexpr const char* kWho = "moe_layer_backward_reference";
  check_ranks(cfg, batches, routed, shared, fwd, kWho);
  const int R = cfg.num_ranks, L = cfg.experts_per_rank(), K = cfg.top_k;
  const int64_t H = cfg.hidden, bound = cfg.row_bound(), Tmax = cfg.max_tokens_per_rank;
  FM_CHECK_ARG(static_cast<int>(gate_up.routed.size()) == R &&
                   static_cast<int>(gate_up.shared.size()) == R &&
                   static_cast<int>(grad_y.size()) == R,
               kWho, ": ", gate_up.routed.size(), " routed and ", gate_up.shared.size(),
               " shared gate_up sets, ", grad_y.size(), " grad_y for num_ranks=", R);
  for (int r = 0; r < R; ++r) {
    const int64_t T = batches[r].tokens;
    FM_CHECK_ARG(gate_up.routed[r].size() == static_cast<size_t>(bound * 2 * routed[r]->inter),
                 kWho, ": rank ", r, " routed gate_up has ", gate_up.routed[r].size(),
                 " values, needs row bound * 2 * inter = ", bound * 2 * routed[r]->inter);
    FM_CHECK_ARG(gate_up.shared[r].size() == static_cast<size_t>(pad128(T) * 2 * shared[r]->inter),
                 kWho, ": rank ", r, " shared gate_up has ", gate_up.shared[r].size(),
                 " values, needs pad128(T) * 2 * inter = ", pad128(T) * 2 * shared[r]->inter);
    FM_CHECK_ARG(grad_y[r].size() == static_cast<size_t>(T * H), kWho, ": rank ", r, " grad_y has ",
                 grad_y[r].size(), " values, needs T * H = ", T * H);
  }
  MoeLayerBackward out;

  // 1. Combine backward: grad of the expert rows and of the gate weights.
  std::vector<std::span<const uint16_t>> ys;
  for (int d = 0; d < R; ++d) ys.emplace_back(fwd.expert_rows[d]);
  CombineBackward cb = combine_backward_reference(cfg, fwd.dispatched, grad_y, ys);
  out.grad_rows = std::move(cb.grad_y);
  out.grad_topk_w = std::move(cb.grad_w);

  // 2. The routed experts' backward on each rank's grouped rows; 3. the per-slot sums.
  out.dx_rows.resize(R);
  out.token_rows.resize(R);
  out.routed_dw13.resize(R);
  out.routed_dw2.resize(R);
  std::vector<const uint16_t*> token_ptr(R);
  std::vector<float> acc(H);
  for (int d = 0; d < R; ++d) {
    const GroupedRecv& g = fwd.dispatched[d].grouped;
    const RecvTokens& recv = fwd.dispatched[d].recv;
    const ExpertWeightsHost& w = *routed[d];
    const int64_t rows = g.expert_offsets[L];
    std::vector<int64_t> expert_rows(L);
    for (int e = 0; e < L; ++e) expert_rows[e] = g.expert_offsets[e + 1] - g.expert_offsets[e];
    out.dx_rows[d].assign(bound * H, 0);
    out.routed_dw13[d].assign(w.groups * 2 * w.inter * H, 0.0f);
    out.routed_dw2[d].assign(w.groups * H * w.inter, 0.0f);
    if (rows > 0)
      expert_ffn_backward_reference(
          fp8_matrix_ref(g.x_fp8.data(), g.x_scales.data(), rows, H, ScaleGranularity::k1x128),
          g.m_indices.data(), expert_rows, w, gate_up.routed[d].data(),
          reinterpret_cast<const bf16*>(out.grad_rows[d].data()), nullptr, pow2_scales,
          reinterpret_cast<bf16*>(out.dx_rows[d].data()), out.routed_dw13[d].data(),
          out.routed_dw2[d].data(), nullptr, threads);
    out.token_rows[d].assign(R * Tmax * H, 0);
    for (int s = 0; s < R; ++s)
      for (int64_t j = 0; j < recv.count[s]; ++j) {
        const int64_t slot = s * Tmax + j;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int k = 0; k < K; ++k) {
          const int32_t row = g.token_rows[slot * K + k];
          if (row < 0) continue;
          const uint16_t* src = out.dx_rows[d].data() + row * H;
          for (int64_t c = 0; c < H; ++c) acc[c] = acc[c] + bf16_bits_to_float(src[c]);
        }
        for (int64_t c = 0; c < H; ++c)
          out.token_rows[d][slot * H + c] = float_to_bf16_bits(acc[c]);
      }
    token_ptr[d] = out.token_rows[d].data();
  }
  out.grad_x_routed = combine_tokens_reference(cfg, fwd.dispatched, token_ptr);

  // 4. The shared expert on each rank's tokens; 5. grad_x = bf16(routed + shared).
  out.grad_x_shared.resize(R);
  out.grad_x.resize(R);
  out.shared_dw13.resize(R);
  out.shared_dw2.resize(R);
  for (int s = 0; s < R; ++s) {
    const ExpertWeightsHost& w = *shared[s];
    const int64_t T = batches[s].tokens, rows = pad128(T);
    out.shared_dw13[s].assign(2 * w.inter * H, 0.0f);
    out.shared_dw2[s].assign(H * w.inter, 0.0f);
    out.grad_x_shared[s].assign(T * H, 0);
    out.grad_x[s].assign(T * H, 0);
    if (T == 0) continue;
    std::vector<uint8_t> codes;
    std::vector<float> scales;
    shared_input(batches[s], H, codes, scales);
    std::vector<int32_t> layout(rows, -1);
    std::fill_n(layout.begin(), T, 0);
    std::vector<uint16_t> dy(rows * H, 0), dx(rows * H, 0);
    std::copy(grad_y[s].begin(), grad_y[s].end(), dy.begin());
    expert_ffn_backward_reference(
        fp8_matrix_ref(codes.data(), scales.data(), rows, H, ScaleGranularity::k1x128),
        layout.data(), {rows}, w, gate_up.shared[s].data(),
        reinterpret_cast<const bf16*>(dy.data()), nullptr, pow2_scales,
        reinterpret_cast<bf16*>(dx.data()), out.shared_dw13[s].data(), out.shared_dw2[s].data(),
        nullptr, threads);
    std::copy_n(dx.begin(), T * H, out.grad_x_shared[s].begin());
    add_bf16_reference(out.grad_x_routed[s].data(), out.grad_x_shared[s].data(), T * H,
                       out.grad_x[s].data());
  }
  return out;
}

}  // namespace fp8moe::comm
