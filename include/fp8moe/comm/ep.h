// Expert-parallel dispatch and combine: the semantics every back end implements.
//
// R ranks, each holding T tokens x[T, H] (BF16), their top-k expert ids topk_idx[T, K] (global
// ids in [0, E), -1 = no expert) and gate weights topk_weight[T, K]. Experts are placed
// contiguously (rank r owns [r*E/R, (r+1)*E/R), as fp8moe/moe/dispatch_layout.h).
//
// Dispatch. Token t of rank s travels once to every rank d that owns at least one of its
// experts. On d it lands in region s at slot j = the number of tokens t' < t of s that also go
// to d (so the receive order is (source rank, token) ascending, whatever route it took). A slot
// holds the payload (BF16 as given, or FP8 E4M3 codes with 1x128 scales quantised at the sender
// with the formula of fp8moe/fp8/quantize.h: scale = max(amax/448, 2^-126), 1 for an all-zero
// tile, code = e4m3(x / scale)), the source token index, the LOCAL expert id of each of its k
// slots (-1 for experts elsewhere) and the K gate weights. Received token i (compact index,
// regions concatenated in source order) is then laid out grouped-contiguous per local expert:
// blocks 128-aligned, rows of an expert in ascending i, m_indices -1 on padding, row_src =
// i*K + k (exactly fp8moe::grouped_layout over the concatenated ids), and the payload rows copied
// there (or the masked layout, see masked_capacity). The number of rows is bounded by
// EpConfig::max_rows; more is an overflow, reported in the result (rows_needed), never written past
// the bound.
//
// Combine. Expert outputs y[rows, H] (BF16, grouped layout) go back and are summed with the gate
// weights, FP32 accumulation, BF16 out. The order of every floating-point operation is fixed so
// that all back ends agree bit for bit (multiplies and adds, never fused):
//   partial_d(s, j) = bf16( sum over k ascending with a row on d of w[k] * y[row] )
//   node_n(t)       = bf16( sum over ranks d of node n ascending that received t of partial_d )
//   out[t]          = bf16( sum over nodes n ascending that received t of node_n(t) )
// (all sums start from +0.0f; a token sent nowhere gets +0). With one node, out = bf16(sum of
// partials). combine_tokens is the same without the expert step: per received token a row is
// given directly (dispatch's backward).
//
// Topology: ranks are grouped in nodes of gpus_per_node consecutive ranks. A token crosses to a
// remote node once, to the rank there with the same local index (the forwarder), which passes
// it on to the ranks of its node; combine reduces per node at that forwarder and sends one row
// back. A token may touch at most max_nodes_per_token nodes (0 = no limit); more is an error
// naming the token.
//
// Combine backward. Given grad_out[t] (BF16 [T, H] at each source rank) and the forward's
// expert outputs y, it returns the gradient of sum(out * grad_out) with the intermediate BF16
// roundings of combine treated as straight-through (out = sum over k of w[t,k] * y[row(t,k)]):
//   grad_y[row(t,k)] = bf16( w[t,k] * grad_out[t] ) element-wise, one float multiply each
//       (at the expert's rank, in its grouped layout; padding and unused rows are +0);
//   grad_w[t,k]      = sum over h ascending of grad_out[t,h] * y[row(t,k),h] in float,
//       starting from +0.0f, each product rounded to float before the add (never fused)
//       (back at the token's source rank, [T, K] float; a dropped slot, expert -1, gets +0).
// The rows travel like a dispatch (grad_out goes once to every rank holding one of t's experts:
// combine's backward is a dispatch) and the K scalars come back like a combine, but every
// gradient value is computed whole at the expert's rank, so the result does not depend on the
// route (one or two stages): nothing is summed across ranks or nodes.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace fp8moe::comm {

enum class Payload { kBF16, kFP8 };
const char* payload_name(Payload p);

inline constexpr int kGroupAlign = 128;  // grouped-contiguous block alignment (the GEMM's BLOCK_M)
inline constexpr int kScaleBlock = 128;  // 1x128 activation scales

struct EpConfig {
  int num_ranks = 1;
  int gpus_per_node = 0;  // 0 = all ranks in one node
  int num_experts = 1;
  int top_k = 1;
  int64_t hidden = 128;
  int64_t max_tokens_per_rank = 0;  // T bound of every sender (size of a source region)
  int64_t max_rows = 0;             // grouped rows bound; 0 = the worst case for the other bounds
  int max_nodes_per_token = 0;      // M; 0 = no limit
  // > 0: the masked layout of low-latency mode instead: local expert e owns rows
  // [e * capacity, (e + 1) * capacity), masked_m[e] = expert_counts[e] of them valid; an expert
  // with more slots is an overflow (rows_needed then = the largest count).
  int64_t masked_capacity = 0;
  Payload payload = Payload::kBF16;
  double timeout_s = 30.0;  // a peer that does not answer within this ends the call

  int experts_per_rank() const { return num_experts / num_ranks; }
  int nodes() const { return num_ranks / ranks_per_node(); }
  int ranks_per_node() const { return gpus_per_node > 0 ? gpus_per_node : num_ranks; }
  int node_of(int rank) const { return rank / ranks_per_node(); }
  int local_of(int rank) const { return rank % ranks_per_node(); }
  int rank_at(int node, int local) const { return node * ranks_per_node() + local; }
  int64_t scale_cols() const { return hidden / kScaleBlock; }
  int64_t max_recv_tokens() const { return num_ranks * max_tokens_per_rank; }
  int64_t row_bound() const;  // max_rows or the worst case
};
// kInvalidArgument naming the field unless the config is consistent (E % R, R % G, H % 128 for
// FP8 and even H, bounds >= 0, ...).
void validate(const EpConfig& cfg);

// One rank's input (host memory, row-major).
struct TokenBatch {
  int64_t tokens = 0;
  const uint16_t* x = nullptr;         // [T, H] BF16 bits
  const int32_t* topk_idx = nullptr;   // [T, K]
  const float* topk_weight = nullptr;  // [T, K]
};

// What a rank received, in source regions of max_tokens_per_rank slots (host memory).
struct RecvTokens {
  std::vector<int32_t> count;       // [R] tokens received from each source
  std::vector<int32_t> src_token;   // [R * Tmax]
  std::vector<int32_t> topk_local;  // [R * Tmax * K] local expert id or -1
  std::vector<float> topk_weight;   // [R * Tmax * K]
  std::vector<uint16_t> x_bf16;     // [R * Tmax * H] (BF16 payload)
  std::vector<uint8_t> x_fp8;       // [R * Tmax * H] (FP8 payload)
  std::vector<float> x_scales;      // [R * Tmax * H/128] (FP8 payload)
  int64_t total() const;
  int64_t offset(int src) const;  // compact index of region src's first token
};

// The grouped-contiguous layout of the received tokens (host memory).
struct GroupedRecv {
  bool overflow = false;
  int64_t rows_needed = 0;              // rows the layout needs (> row bound on overflow)
  int64_t num_rows = 0;                 // rows written (0 on overflow)
  std::vector<int32_t> expert_counts;   // [L]
  std::vector<int32_t> expert_offsets;  // [L + 1]
  std::vector<int32_t> m_indices;       // [row bound] local expert, -1 on padding and past num_rows
  std::vector<int32_t> row_src;         // [row bound] i * K + k, -1 on padding
  std::vector<int32_t> token_rows;      // [R * Tmax * K] row of (region slot, k), -1 if none
  std::vector<uint16_t> x_bf16;         // [row bound, H] (padding rows unspecified)
  std::vector<uint8_t> x_fp8;           // [row bound, H]
  std::vector<float> x_scales;          // [row bound, H/128]
};

// What the source rank keeps for combine.
struct SendHandle {
  int64_t tokens = 0;
  std::vector<int32_t> slot;  // [T * R] slot j of token t in its region at rank d, -1 if not sent
  // Two-stage route: index q of token t among the tokens sent to node n's forwarder, -1 if
  // none ([T * nodes]); filled by the back ends that forward (the reference leaves it empty).
  std::vector<int32_t> node_slot;
};

// What a forwarder keeps: for source s (same local index, any node) and its q-th forwarded
// token, the slot j at each rank of the forwarder's node (-1 if not sent there).
struct ForwardHandle {
  std::vector<int32_t> count;  // [R] tokens forwarded for each source
  std::vector<int32_t> slot;   // [R * Tmax * gpus_per_node]
};

struct DispatchResult {
  RecvTokens recv;
  GroupedRecv grouped;
  SendHandle handle;
  ForwardHandle forward;  // filled by forwarding back ends
};

// ---- reference (one thread, all ranks at once) ----
// Checks its inputs (ids in range, T <= Tmax, node limit) and throws kInvalidArgument naming the
// rank and token at fault.
std::vector<DispatchResult> dispatch_reference(const EpConfig& cfg,
                                               const std::vector<TokenBatch>& batches);
// y[d]: rank d's expert outputs [row bound, H] BF16 in its grouped layout. Returns out[s] [T, H].
std::vector<std::vector<uint16_t>> combine_reference(const EpConfig& cfg,
                                                     const std::vector<DispatchResult>& dispatched,
                                                     const std::vector<const uint16_t*>& y);
// rows[d]: one BF16 row per received slot [R * Tmax, H] (dispatch's backward).
std::vector<std::vector<uint16_t>> combine_tokens_reference(
    const EpConfig& cfg, const std::vector<DispatchResult>& dispatched,
    const std::vector<const uint16_t*>& rows);

// Combine backward (see the header comment). grad_out[s]: source s's [T_s, H] BF16 output
// gradient (exactly T_s * H values); y[d]: rank d's expert outputs of the forward, [row bound, H]
// BF16 (exactly row bound * H values). kInvalidArgument naming the rank and the sizes otherwise,
// or for a dispatch that overflowed its row bound.
struct CombineBackward {
  std::vector<std::vector<uint16_t>> grad_y;  // [R][row bound * H] BF16, per expert rank
  std::vector<std::vector<float>> grad_w;     // [R][T_s * K], per source rank
};
// One rank's share of CombineBackward (what a back end's rank returns).
struct RankCombineBackward {
  std::vector<uint16_t> grad_y;  // [row bound * H] BF16, this rank's expert rows
  std::vector<float> grad_w;     // [T * K], this rank's tokens
};
CombineBackward combine_backward_reference(const EpConfig& cfg,
                                           const std::vector<DispatchResult>& dispatched,
                                           const std::vector<std::span<const uint16_t>>& grad_out,
                                           const std::vector<std::span<const uint16_t>>& y);

// ---- shared pieces (used by every back end) ----
// FP8 quantisation of one BF16 row of H values (H % 128 == 0), the fp8/quantize.h formula.
void quantize_row_fp8(const uint16_t* x, int64_t hidden, uint8_t* codes, float* scales);
// The grouped layout of already received tokens (fills `grouped` except the payload rows).
void build_grouped_layout(const EpConfig& cfg, int rank, const RecvTokens& recv,
                          GroupedRecv& grouped);
// Copy payload rows into the grouped layout (after build_grouped_layout).
void fill_grouped_payload(const EpConfig& cfg, const RecvTokens& recv, GroupedRecv& grouped);
// The slot of every (token, dest) for a source's batch; validates ids and the node limit.
SendHandle make_send_handle(const EpConfig& cfg, int rank, const TokenBatch& batch);
// partial_d(s, j) of the header comment, as float rounded to BF16 bits.
void expert_partial(const EpConfig& cfg, const GroupedRecv& grouped, const RecvTokens& recv,
                    int src, int slot, const uint16_t* y, uint16_t* out_row);
// Combine backward at the expert's rank for received token (src, slot) with output gradient row
// g: writes grad_y rows into grad_y ([row bound, H]) and, for each k, grad_w[k] (+0 where the
// slot has no row here) and mine[k] = 1 where it has one (else 0).
void expert_grad(const EpConfig& cfg, const GroupedRecv& grouped, const RecvTokens& recv, int src,
                 int slot, const uint16_t* g, const uint16_t* y, uint16_t* grad_y, float* grad_w,
                 uint8_t* mine);
// kInvalidArgument unless the dispatch can be combined (no overflow) and the backward's inputs
// have their sizes: grad_out T * H values, y row bound * H values; messages name `rank`.
void check_combine_backward_args(const EpConfig& cfg, int rank, const DispatchResult& d,
                                 std::span<const uint16_t> grad_out, std::span<const uint16_t> y);

}  // namespace fp8moe::comm
