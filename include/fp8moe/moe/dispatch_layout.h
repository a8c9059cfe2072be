// Dispatch layout: from the router's top-k expert ids to where every (token, slot) pair goes.
//
// Vocabulary
//   slot      one (token t, k) entry of topk_idx [T, K]; its flat index is t * K + k.
//             An id of -1 in topk_idx means "no expert" (a dropped / masked slot): it is
//             counted nowhere and maps to no row.
//   placement experts are placed on ranks contiguously: rank r owns experts
//             [r * E / R, (r + 1) * E / R) (E % R == 0). Its "local" experts are numbered
//             0 .. E/R - 1 in that order.
//
// Three layouts, all deterministic (rows of one expert are in ascending slot order, i.e. by
// token index, since a token picks an expert at most once):
//   DispatchCounts   per-expert slot counts, per-rank token counts (a token is sent to a rank
//                    once, however many of its experts live there) and the [T, R] membership.
//   GroupedLayout    the grouped-contiguous layout of the FP8 grouped GEMM: one row per slot
//                    routed to an expert of [expert_begin, expert_end); each expert's block
//                    starts at a multiple of `align` (128) and is padded up to the next multiple;
//                    m_indices[row] = local expert of the row, -1 on padding rows.
//   MaskedLayout     the masked layout for decoding: a fixed block of `capacity` rows per local
//                    expert; masked_m[e] rows of block e are valid, the rest are padding.
// Both row layouts carry the forward map row -> slot (row_src, -1 on padding) and the inverse
// map slot -> row (src_to_row, -1 when the slot's expert is not in the range), which is what
// combine needs: out[t] = sum_k w[t,k] * y[src_to_row[t*K+k]] over k with src_to_row != -1.
//
// The CUDA versions (dispatch_layout_cuda.h) produce the same arrays bit for bit.
#pragma once

#include <cstdint>
#include <vector>

namespace fp8moe {

inline constexpr int kGroupedLayoutAlign = 128;

// Contiguous placement of E experts on R ranks.
struct ExpertSharding {
  int num_experts = 0;
  int num_ranks = 1;
  int experts_per_rank() const { return num_experts / num_ranks; }
  int rank_of(int expert) const { return expert / experts_per_rank(); }
  int first_expert(int rank) const { return rank * experts_per_rank(); }
  int end_expert(int rank) const { return (rank + 1) * experts_per_rank(); }
};
// Throws kInvalidArgument unless E > 0, R > 0 and E % R == 0.
void validate_sharding(const ExpertSharding& sharding);

struct DispatchCounts {
  int num_experts = 0;
  int num_ranks = 0;
  int64_t tokens = 0;
  std::vector<int32_t> tokens_per_expert;  // [E] slots routed to expert e
  std::vector<int32_t> tokens_per_rank;    // [R] tokens with at least one expert on rank r
  std::vector<uint8_t> token_in_rank;      // [T, R] 1 when token t goes to rank r
};

// topk_idx [T, K] row-major, ids in [0, E) or -1. Throws kInvalidArgument on an id out of range.
DispatchCounts dispatch_counts(const int32_t* topk_idx, int64_t tokens, int top_k,
                               const ExpertSharding& sharding);

struct GroupedLayout {
  int expert_begin = 0;  // global id of local expert 0
  int expert_end = 0;    // one past the last local expert
  int align = kGroupedLayoutAlign;
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<int32_t> expert_counts;   // [L] slots routed to each local expert
  std::vector<int32_t> expert_offsets;  // [L + 1] first row of each block; multiples of align
  std::vector<int32_t> m_indices;       // [rows] local expert of each row, -1 on padding
  std::vector<int32_t> row_src;         // [rows] slot (t * K + k) of each row, -1 on padding
  std::vector<int32_t> src_to_row;      // [T * K] row of each slot, -1 if not local
  int num_local_experts() const { return expert_end - expert_begin; }
  int64_t num_rows() const { return static_cast<int64_t>(m_indices.size()); }
};

// Rows are sum over local experts of round_up(count, align); an expert with no slots has an
// empty block (offsets[e] == offsets[e + 1]). align must be > 0.
GroupedLayout grouped_layout(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                             int expert_end, int align = kGroupedLayoutAlign);
// The same for rank `rank` of a contiguous sharding.
GroupedLayout grouped_layout(const int32_t* topk_idx, int64_t tokens, int top_k,
                             const ExpertSharding& sharding, int rank,
                             int align = kGroupedLayoutAlign);
// An upper bound on num_rows() whatever the ids are (for preallocating device buffers): T*K
// slots plus align - 1 padding rows for each of min(L, T*K) non-empty experts, rounded up to
// align.
int64_t grouped_layout_max_rows(int64_t tokens, int top_k, int num_local_experts,
                                int align = kGroupedLayoutAlign);

struct MaskedLayout {
  int expert_begin = 0;
  int expert_end = 0;
  int capacity = 0;  // rows per local expert block
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<int32_t> masked_m;    // [L] valid rows of each block (= slots routed to it)
  std::vector<int32_t> row_src;     // [L * capacity] slot of each row, -1 on padding
  std::vector<int32_t> src_to_row;  // [T * K] row (e * capacity + j) of each slot, -1 if not local
  int num_local_experts() const { return expert_end - expert_begin; }
};

// Throws kInvalidArgument naming the expert if an expert receives more than `capacity` slots
// (decoding sizes capacity for the worst case, so this is a caller bug).
MaskedLayout masked_layout(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                           int expert_end, int capacity);

// Reference permute / combine over the layouts (float rows of `hidden` values), for tests and
// the CPU model path. permute: out[row] = x[token of row_src[row]], padding rows zero.
// combine: out[t] = sum over k with src_to_row != -1 of weight[t, k] * y[src_to_row[t*K+k]],
// summed in ascending k.
std::vector<float> permute_rows(const std::vector<int32_t>& row_src, int top_k, const float* x,
                                int64_t hidden);
std::vector<float> combine_rows(const std::vector<int32_t>& src_to_row, int64_t tokens, int top_k,
                                const float* weight, const float* y, int64_t hidden);

}  // namespace fp8moe
