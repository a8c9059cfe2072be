// The meaning of dispatch, combine and combine backward (fp8moe/comm/ep.h), computed with a
// global view of all ranks in one thread. Every back end is tested against these functions bit
// for bit.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "fp8moe/comm/ep.h"
#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"

namespace fp8moe::comm {

const char* payload_name(Payload p) {
  return p == Payload::kFP8 ? "fp8" : "bf16";
}

int64_t EpConfig::row_bound() const {
  if (masked_capacity > 0) return static_cast<int64_t>(experts_per_rank()) * masked_capacity;
  if (max_rows > 0) return max_rows;
  const int64_t local_slots = std::min<int64_t>(top_k, experts_per_rank());
  const int64_t slots = max_recv_tokens() * local_slots;
  const int64_t rows = slots + static_cast<int64_t>(experts_per_rank()) * (kGroupAlign - 1);
  return (rows + kGroupAlign - 1) / kGroupAlign * kGroupAlign;
}

void validate(const EpConfig& cfg) {
  FM_CHECK_ARG(cfg.num_ranks > 0, "num_ranks=", cfg.num_ranks, " must be positive");
  FM_CHECK_ARG(cfg.gpus_per_node >= 0 && cfg.num_ranks % cfg.ranks_per_node() == 0,
               "gpus_per_node=", cfg.gpus_per_node, " does not divide num_ranks=", cfg.num_ranks);
  FM_CHECK_ARG(cfg.num_experts > 0 && cfg.num_experts % cfg.num_ranks == 0,
               "num_experts=", cfg.num_experts,
               " is not a positive multiple of num_ranks=", cfg.num_ranks);
  FM_CHECK_ARG(cfg.top_k >= 1 && cfg.top_k <= cfg.num_experts, "top_k=", cfg.top_k,
               " must be in [1, num_experts=", cfg.num_experts, "]");
  FM_CHECK_ARG(cfg.hidden > 0 && cfg.hidden % 8 == 0, "hidden=", cfg.hidden,
               " must be a positive multiple of 8");
  FM_CHECK_ARG(cfg.payload != Payload::kFP8 || cfg.hidden % kScaleBlock == 0, "hidden=", cfg.hidden,
               " must be a multiple of 128 for the FP8 payload");
  FM_CHECK_ARG(cfg.max_tokens_per_rank >= 0, "max_tokens_per_rank=", cfg.max_tokens_per_rank,
               " is negative");
  FM_CHECK_ARG(cfg.max_rows >= 0 && cfg.max_rows % kGroupAlign == 0, "max_rows=", cfg.max_rows,
               " must be a non-negative multiple of 128");
  FM_CHECK_ARG(cfg.masked_capacity >= 0, "masked_capacity=", cfg.masked_capacity, " is negative");
  FM_CHECK_ARG(cfg.max_nodes_per_token >= 0, "max_nodes_per_token=", cfg.max_nodes_per_token,
               " is negative");
  FM_CHECK_ARG(cfg.timeout_s > 0, "timeout_s=", cfg.timeout_s, " must be positive");
}

int64_t RecvTokens::total() const {
  int64_t n = 0;
  for (int32_t c : count) n += c;
  return n;
}
int64_t RecvTokens::offset(int src) const {
  int64_t n = 0;
  for (int s = 0; s < src; ++s) n += count[s];
  return n;
}

void quantize_row_fp8(const uint16_t* x, int64_t hidden, uint8_t* codes, float* scales) {
  for (int64_t g = 0; g < hidden / kScaleBlock; ++g) {
    const uint16_t* xs = x + g * kScaleBlock;
    float amax = 0.0f;
    for (int i = 0; i < kScaleBlock; ++i)
      amax = std::max(amax, std::fabs(bf16_bits_to_float(xs[i])));
    // NOTE: the formula of fp8/quantize.h (non-pow2 scales), written out so that the device
    // kernels can use the very same operations.
    float scale = amax == 0.0f ? 1.0f : std::max(amax / kE4M3Max, 0x1p-126f);
    scales[g] = scale;
    for (int i = 0; i < kScaleBlock; ++i)
      codes[g * kScaleBlock + i] = float_to_e4m3_bits(bf16_bits_to_float(xs[i]) / scale);
  }
}

SendHandle make_send_handle(const EpConfig& cfg, int rank, const TokenBatch& batch) {
  const int R = cfg.num_ranks, K = cfg.top_k, E = cfg.num_experts;
  FM_CHECK_ARG(batch.tokens >= 0 && batch.tokens <= cfg.max_tokens_per_rank, "rank ", rank, ": ",
               batch.tokens, " tokens exceed max_tokens_per_rank=", cfg.max_tokens_per_rank);
  SendHandle h;
  h.tokens = batch.tokens;
  h.slot.assign(static_cast<size_t>(batch.tokens * R), -1);
  std::vector<int32_t> next(R, 0);
  std::vector<uint8_t> node_hit(cfg.nodes());
  for (int64_t t = 0; t < batch.tokens; ++t) {
    std::fill(node_hit.begin(), node_hit.end(), 0);
    for (int k = 0; k < K; ++k) {
      const int32_t e = batch.topk_idx[t * K + k];
      FM_CHECK_ARG(e >= -1 && e < E, "rank ", rank, " token ", t, ": expert id ", e,
                   " out of range [-1, ", E, ")");
      if (e < 0) continue;
      const int d = e / cfg.experts_per_rank();
      h.slot[t * R + d] = 0;  // marked; numbered below
      node_hit[cfg.node_of(d)] = 1;
    }
    int nodes = 0;
    for (uint8_t v : node_hit) nodes += v;
    FM_CHECK_ARG(cfg.max_nodes_per_token == 0 || nodes <= cfg.max_nodes_per_token, "rank ", rank,
                 " token ", t, ": its experts span ", nodes,
                 " nodes, more than max_nodes_per_token=", cfg.max_nodes_per_token);
    for (int d = 0; d < R; ++d)
      if (h.slot[t * R + d] == 0) h.slot[t * R + d] = next[d]++;
  }
  return h;
}

static void resize_recv(const EpConfig& cfg, RecvTokens& r) {
  const int64_t slots = cfg.max_recv_tokens();
  r.count.assign(cfg.num_ranks, 0);
  r.src_token.assign(slots, -1);
  r.topk_local.assign(slots * cfg.top_k, -1);
  r.topk_weight.assign(slots * cfg.top_k, 0.0f);
  if (cfg.payload == Payload::kBF16) {
    r.x_bf16.assign(slots * cfg.hidden, 0);
  } else {
    r.x_fp8.assign(slots * cfg.hidden, 0);
    r.x_scales.assign(slots * cfg.scale_cols(), 0.0f);
  }
}

void build_grouped_layout(const EpConfig& cfg, int rank, const RecvTokens& recv, GroupedRecv& g) {
  (void)rank;
  const int L = cfg.experts_per_rank(), K = cfg.top_k, R = cfg.num_ranks;
  const int64_t Tmax = cfg.max_tokens_per_rank, bound = cfg.row_bound();
  g.expert_counts.assign(L, 0);
  g.expert_offsets.assign(L + 1, 0);
  g.m_indices.assign(bound, -1);
  g.row_src.assign(bound, -1);
  g.token_rows.assign(cfg.max_recv_tokens() * K, -1);
  for (int s = 0; s < R; ++s)
    for (int64_t j = 0; j < recv.count[s]; ++j)
      for (int k = 0; k < K; ++k) {
        const int32_t e = recv.topk_local[(s * Tmax + j) * K + k];
        if (e >= 0) ++g.expert_counts[e];
      }
  if (cfg.masked_capacity > 0) {
    int32_t largest = 0;
    for (int e = 0; e < L; ++e) {
      g.expert_offsets[e + 1] = static_cast<int32_t>((e + 1) * cfg.masked_capacity);
      largest = std::max(largest, g.expert_counts[e]);
    }
    g.overflow = largest > cfg.masked_capacity;
    g.rows_needed = g.overflow ? largest : bound;
  } else {
    for (int e = 0; e < L; ++e)
      g.expert_offsets[e + 1] =
          g.expert_offsets[e] + (g.expert_counts[e] + kGroupAlign - 1) / kGroupAlign * kGroupAlign;
    g.rows_needed = g.expert_offsets[L];
    g.overflow = g.rows_needed > bound;
  }
  g.num_rows = g.overflow ? 0 : g.rows_needed;
  if (g.overflow) return;
  std::vector<int32_t> fill(g.expert_offsets.begin(), g.expert_offsets.end() - 1);
  int64_t i = 0;
  for (int s = 0; s < R; ++s)
    for (int64_t j = 0; j < recv.count[s]; ++j, ++i)
      for (int k = 0; k < K; ++k) {
        const int32_t e = recv.topk_local[(s * Tmax + j) * K + k];
        if (e < 0) continue;
        const int32_t row = fill[e]++;
        g.m_indices[row] = e;
        g.row_src[row] = static_cast<int32_t>(i * K + k);
        g.token_rows[(s * Tmax + j) * K + k] = row;
      }
  for (int e = 0; e < L; ++e)
    for (int32_t row = fill[e]; row < g.expert_offsets[e + 1]; ++row) g.m_indices[row] = -1;
}

void fill_grouped_payload(const EpConfig& cfg, const RecvTokens& recv, GroupedRecv& g) {
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), bound = cfg.row_bound();
  const int K = cfg.top_k;
  const int64_t Tmax = cfg.max_tokens_per_rank;
  if (cfg.payload == Payload::kBF16) {
    g.x_bf16.assign(bound * H, 0);
  } else {
    g.x_fp8.assign(bound * H, 0);
    g.x_scales.assign(bound * SC, 0.0f);
  }
  if (g.overflow) return;
  for (int s = 0; s < cfg.num_ranks; ++s)
    for (int64_t j = 0; j < recv.count[s]; ++j)
      for (int k = 0; k < K; ++k) {
        const int32_t row = g.token_rows[(s * Tmax + j) * K + k];
        if (row < 0) continue;
        const int64_t src = s * Tmax + j;
        if (cfg.payload == Payload::kBF16) {
          std::memcpy(&g.x_bf16[row * H], &recv.x_bf16[src * H], H * sizeof(uint16_t));
        } else {
          std::memcpy(&g.x_fp8[row * H], &recv.x_fp8[src * H], H);
          std::memcpy(&g.x_scales[row * SC], &recv.x_scales[src * SC], SC * sizeof(float));
        }
      }
}

void expert_partial(const EpConfig& cfg, const GroupedRecv& g, const RecvTokens& recv, int src,
                    int slot, const uint16_t* y, uint16_t* out_row) {
  const int K = cfg.top_k;
  const int64_t H = cfg.hidden, base = (src * cfg.max_tokens_per_rank + slot) * K;
  std::vector<float> acc(H, 0.0f);
  for (int k = 0; k < K; ++k) {
    const int32_t row = g.token_rows[base + k];
    if (row < 0) continue;
    const float w = recv.topk_weight[base + k];
    for (int64_t h = 0; h < H; ++h) {
      const float prod = w * bf16_bits_to_float(y[row * H + h]);
      acc[h] = acc[h] + prod;
    }
  }
  for (int64_t h = 0; h < H; ++h) out_row[h] = float_to_bf16_bits(acc[h]);
}

void expert_grad(const EpConfig& cfg, const GroupedRecv& g, const RecvTokens& recv, int src,
                 int slot, const uint16_t* go, const uint16_t* y, uint16_t* grad_y, float* grad_w,
                 uint8_t* mine) {
  const int K = cfg.top_k;
  const int64_t H = cfg.hidden, base = (src * cfg.max_tokens_per_rank + slot) * K;
  for (int k = 0; k < K; ++k) {
    const int32_t row = g.token_rows[base + k];
    grad_w[k] = 0.0f;
    mine[k] = row >= 0;
    if (row < 0) continue;
    const float w = recv.topk_weight[base + k];
    float dot = 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      const float gh = bf16_bits_to_float(go[h]);
      grad_y[row * H + h] = float_to_bf16_bits(w * gh);
      // NOTE: the product is rounded to float before the add (no FMA), as the header fixes, so
      // every back end gets the same bits.
      const float prod = gh * bf16_bits_to_float(y[row * H + h]);
      dot = dot + prod;
    }
    grad_w[k] = dot;
  }
}

void check_combine_backward_args(const EpConfig& cfg, int rank, const DispatchResult& d,
                                 std::span<const uint16_t> grad_out, std::span<const uint16_t> y) {
  const int64_t H = cfg.hidden, bound = cfg.row_bound();
  FM_CHECK_ARG(
      static_cast<int64_t>(d.grouped.token_rows.size()) == cfg.max_recv_tokens() * cfg.top_k &&
          static_cast<int64_t>(d.recv.count.size()) == cfg.num_ranks &&
          static_cast<int64_t>(d.handle.slot.size()) == d.handle.tokens * cfg.num_ranks,
      "rank ", rank, ": the dispatch result does not match the config (R=", cfg.num_ranks,
      ", K=", cfg.top_k, ", max_tokens_per_rank=", cfg.max_tokens_per_rank, ")");
  FM_CHECK_ARG(!d.grouped.overflow, "rank ", rank,
               ": combine backward of a dispatch that overflowed its row bound (",
               d.grouped.rows_needed, " rows needed, bound ", bound, ")");
  FM_CHECK_ARG(static_cast<int64_t>(grad_out.size()) == d.handle.tokens * H, "rank ", rank,
               ": grad_out has ", grad_out.size(), " values, expected T*H = ", d.handle.tokens, "*",
               H, " = ", d.handle.tokens * H);
  FM_CHECK_ARG(static_cast<int64_t>(y.size()) == bound * H, "rank ", rank, ": y has ", y.size(),
               " values, expected row bound * H = ", bound, "*", H, " = ", bound * H);
}

std::vector<DispatchResult> dispatch_reference(const EpConfig& cfg,
                                               const std::vector<TokenBatch>& batches) {
  validate(cfg);
  const int R = cfg.num_ranks, K = cfg.top_k, L = cfg.experts_per_rank();
  const int64_t H = cfg.hidden, SC = cfg.scale_cols(), Tmax = cfg.max_tokens_per_rank;
  FM_CHECK_ARG(static_cast<int>(batches.size()) == R, batches.size(), " batches for ", R, " ranks");
  std::vector<DispatchResult> out(R);
  for (int s = 0; s < R; ++s) out[s].handle = make_send_handle(cfg, s, batches[s]);
  std::vector<uint8_t> codes(H);
  std::vector<float> scales(SC);
  for (int d = 0; d < R; ++d) {
    RecvTokens& r = out[d].recv;
    resize_recv(cfg, r);
    for (int s = 0; s < R; ++s) {
      const TokenBatch& b = batches[s];
      for (int64_t t = 0; t < b.tokens; ++t) {
        const int32_t j = out[s].handle.slot[t * R + d];
        if (j < 0) continue;
        const int64_t at = s * Tmax + j;
        ++r.count[s];
        r.src_token[at] = static_cast<int32_t>(t);
        for (int k = 0; k < K; ++k) {
          const int32_t e = b.topk_idx[t * K + k];
          r.topk_local[at * K + k] = (e >= d * L && e < (d + 1) * L) ? e - d * L : -1;
          r.topk_weight[at * K + k] = b.topk_weight[t * K + k];
        }
        if (cfg.payload == Payload::kBF16) {
          std::memcpy(&r.x_bf16[at * H], &b.x[t * H], H * sizeof(uint16_t));
        } else {
          quantize_row_fp8(&b.x[t * H], H, codes.data(), scales.data());
          std::memcpy(&r.x_fp8[at * H], codes.data(), H);
          std::memcpy(&r.x_scales[at * SC], scales.data(), SC * sizeof(float));
        }
      }
    }
    build_grouped_layout(cfg, d, r, out[d].grouped);
    fill_grouped_payload(cfg, r, out[d].grouped);
  }
  return out;
}

// The two-level sum of the header comment, given partial(d, s, slot) rows.
template <typename PartialFn>
static std::vector<std::vector<uint16_t>> reduce_back(const EpConfig& cfg,
                                                      const std::vector<DispatchResult>& disp,
                                                      PartialFn partial) {
  const int R = cfg.num_ranks, G = cfg.ranks_per_node();
  const int64_t H = cfg.hidden;
  std::vector<std::vector<uint16_t>> out(R);
  std::vector<float> node_acc(H), acc(H);
  for (int s = 0; s < R; ++s) {
    const SendHandle& h = disp[s].handle;
    out[s].assign(h.tokens * H, 0);
    for (int64_t t = 0; t < h.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int n = 0; n < cfg.nodes(); ++n) {
        bool present = false;
        std::fill(node_acc.begin(), node_acc.end(), 0.0f);
        for (int d = n * G; d < (n + 1) * G; ++d) {
          const int32_t j = h.slot[t * R + d];
          if (j < 0) continue;
          present = true;
          const uint16_t* row = partial(d, s, j);
          for (int64_t x = 0; x < H; ++x) node_acc[x] = node_acc[x] + bf16_bits_to_float(row[x]);
        }
        if (!present) continue;
        for (int64_t x = 0; x < H; ++x) acc[x] = acc[x] + round_to_bf16(node_acc[x]);
      }
      for (int64_t x = 0; x < H; ++x) out[s][t * H + x] = float_to_bf16_bits(acc[x]);
    }
  }
  return out;
}

std::vector<std::vector<uint16_t>> combine_reference(const EpConfig& cfg,
                                                     const std::vector<DispatchResult>& disp,
                                                     const std::vector<const uint16_t*>& y) {
  validate(cfg);
  const int64_t H = cfg.hidden;
  for (const auto& d : disp)
    FM_CHECK_ARG(!d.grouped.overflow, "combine of a dispatch that overflowed its row bound (",
                 d.grouped.rows_needed, " rows needed)");
  std::vector<uint16_t> row(H);
  return reduce_back(cfg, disp, [&](int d, int s, int32_t j) {
    expert_partial(cfg, disp[d].grouped, disp[d].recv, s, j, y[d], row.data());
    return row.data();
  });
}

std::vector<std::vector<uint16_t>> combine_tokens_reference(
    const EpConfig& cfg, const std::vector<DispatchResult>& disp,
    const std::vector<const uint16_t*>& rows) {
  validate(cfg);
  const int64_t H = cfg.hidden, Tmax = cfg.max_tokens_per_rank;
  return reduce_back(cfg, disp,
                     [&](int d, int s, int32_t j) { return rows[d] + (s * Tmax + j) * H; });
}

CombineBackward combine_backward_reference(const EpConfig& cfg,
                                           const std::vector<DispatchResult>& disp,
                                           const std::vector<std::span<const uint16_t>>& grad_out,
                                           const std::vector<std::span<const uint16_t>>& y) {
  validate(cfg);
  const int R = cfg.num_ranks, K = cfg.top_k;
  const int64_t H = cfg.hidden, Tmax = cfg.max_tokens_per_rank;
  FM_CHECK_ARG(static_cast<int>(disp.size()) == R && static_cast<int>(grad_out.size()) == R &&
                   static_cast<int>(y.size()) == R,
               "combine backward takes one dispatch result, grad_out and y per rank (", R,
               " ranks): got ", disp.size(), ", ", grad_out.size(), ", ", y.size());
  for (int r = 0; r < R; ++r) check_combine_backward_args(cfg, r, disp[r], grad_out[r], y[r]);
  CombineBackward res;
  res.grad_y.resize(R);
  res.grad_w.resize(R);
  for (int r = 0; r < R; ++r) {
    res.grad_y[r].assign(static_cast<size_t>(cfg.row_bound() * H), 0);
    res.grad_w[r].assign(static_cast<size_t>(disp[r].handle.tokens * K), 0.0f);
  }
  std::vector<float> gw(K);
  std::vector<uint8_t> mine(K);
  for (int d = 0; d < R; ++d) {
    const RecvTokens& recv = disp[d].recv;
    for (int s = 0; s < R; ++s)
      for (int32_t j = 0; j < recv.count[s]; ++j) {
        const int64_t t = recv.src_token[s * Tmax + j];
        expert_grad(cfg, disp[d].grouped, recv, s, j, grad_out[s].data() + t * H, y[d].data(),
                    res.grad_y[d].data(), gw.data(), mine.data());
        for (int k = 0; k < K; ++k)
          if (mine[k]) res.grad_w[s][t * K + k] = gw[k];
      }
  }
  return res;
}

}  // namespace fp8moe::comm
