// Dispatch layout on the CPU: counts, grouped-contiguous and masked layouts with their inverse
// maps. The reference for src/moe/dispatch_layout.cu; see include/fp8moe/moe/dispatch_layout.h.
#include "fp8moe/moe/dispatch_layout.h"

#include <algorithm>

#include "fp8moe/core/error.h"

namespace fp8moe {

namespace {

void check_ids(const int32_t* topk_idx, int64_t tokens, int top_k, int num_experts) {
  FM_CHECK_ARG(tokens >= 0, "tokens=", tokens, " must be >= 0");
  FM_CHECK_ARG(top_k > 0, "top_k=", top_k, " must be > 0");
  FM_CHECK_ARG(tokens * top_k <= INT32_MAX, "T*K=", tokens * top_k, " exceeds int32 rows");
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    const int32_t e = topk_idx[i];
    FM_CHECK_ARG(e >= -1 && e < num_experts, "topk_idx[", i / top_k, "][", i % top_k, "]=", e,
                 " is outside [-1, ", num_experts, ")");
  }
}

void check_range(int expert_begin, int expert_end) {
  FM_CHECK_ARG(expert_begin >= 0 && expert_end >= expert_begin, "expert range [", expert_begin,
               ", ", expert_end, ") is invalid");
}

}  // namespace

void validate_sharding(const ExpertSharding& s) {
  FM_CHECK_ARG(s.num_experts > 0, "num_experts=", s.num_experts, " must be > 0");
  FM_CHECK_ARG(s.num_ranks > 0, "num_ranks=", s.num_ranks, " must be > 0");
  FM_CHECK_ARG(s.num_experts % s.num_ranks == 0, "num_experts=", s.num_experts,
               " is not divisible by num_ranks=", s.num_ranks);
}

DispatchCounts dispatch_counts(const int32_t* topk_idx, int64_t tokens, int top_k,
                               const ExpertSharding& sharding) {
  validate_sharding(sharding);
  check_ids(topk_idx, tokens, top_k, sharding.num_experts);
  const int R = sharding.num_ranks;
  DispatchCounts out;
  out.num_experts = sharding.num_experts;
  out.num_ranks = R;
  out.tokens = tokens;
  out.tokens_per_expert.assign(sharding.num_experts, 0);
  out.tokens_per_rank.assign(R, 0);
  out.token_in_rank.assign(static_cast<size_t>(tokens) * R, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    uint8_t* in_rank = out.token_in_rank.data() + t * R;
    for (int k = 0; k < top_k; ++k) {
      const int32_t e = topk_idx[t * top_k + k];
      if (e < 0) continue;
      ++out.tokens_per_expert[e];
      in_rank[sharding.rank_of(e)] = 1;
    }
    for (int r = 0; r < R; ++r) out.tokens_per_rank[r] += in_rank[r];
  }
  return out;
}

int64_t grouped_layout_max_rows(int64_t tokens, int top_k, int num_local_experts, int align) {
  FM_CHECK_ARG(align > 0, "align=", align, " must be > 0");
  const int64_t slots = tokens * top_k;
  // Each non-empty expert adds at most align - 1 padding rows; at most min(L, slots) are
  // non-empty.
  const int64_t padded = slots + std::min<int64_t>(num_local_experts, slots) * (align - 1);
  return (padded + align - 1) / align * align;
}

GroupedLayout grouped_layout(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                             int expert_end, int align) {
  check_range(expert_begin, expert_end);
  FM_CHECK_ARG(align > 0, "align=", align, " must be > 0");
  check_ids(topk_idx, tokens, top_k, INT32_MAX);
  const int L = expert_end - expert_begin;
  GroupedLayout out;
  out.expert_begin = expert_begin;
  out.expert_end = expert_end;
  out.align = align;
  out.tokens = tokens;
  out.top_k = top_k;
  out.expert_counts.assign(L, 0);
  const int64_t slots = tokens * top_k;
  // Counts, then block offsets rounded up to the alignment.
  for (int64_t i = 0; i < slots; ++i) {
    const int32_t e = topk_idx[i];
    if (e >= expert_begin && e < expert_end) ++out.expert_counts[e - expert_begin];
  }
  out.expert_offsets.assign(L + 1, 0);
  for (int e = 0; e < L; ++e) {
    const int64_t padded = (static_cast<int64_t>(out.expert_counts[e]) + align - 1) / align * align;
    out.expert_offsets[e + 1] = static_cast<int32_t>(out.expert_offsets[e] + padded);
  }
  const int64_t rows = out.expert_offsets[L];
  out.m_indices.assign(rows, -1);
  out.row_src.assign(rows, -1);
  out.src_to_row.assign(slots, -1);
  // Fill in ascending slot order so that rows of an expert are sorted by token.
  std::vector<int32_t> cursor(out.expert_offsets.begin(), out.expert_offsets.end() - 1);
  for (int64_t i = 0; i < slots; ++i) {
    const int32_t e = topk_idx[i];
    if (e < expert_begin || e >= expert_end) continue;
    const int32_t row = cursor[e - expert_begin]++;
    out.m_indices[row] = e - expert_begin;
    out.row_src[row] = static_cast<int32_t>(i);
    out.src_to_row[i] = row;
  }
  return out;
}

GroupedLayout grouped_layout(const int32_t* topk_idx, int64_t tokens, int top_k,
                             const ExpertSharding& sharding, int rank, int align) {
  validate_sharding(sharding);
  FM_CHECK_ARG(rank >= 0 && rank < sharding.num_ranks, "rank=", rank, " is outside [0, ",
               sharding.num_ranks, ")");
  check_ids(topk_idx, tokens, top_k, sharding.num_experts);
  return grouped_layout(topk_idx, tokens, top_k, sharding.first_expert(rank),
                        sharding.end_expert(rank), align);
}

MaskedLayout masked_layout(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                           int expert_end, int capacity) {
  check_range(expert_begin, expert_end);
  FM_CHECK_ARG(capacity >= 0, "capacity=", capacity, " must be >= 0");
  check_ids(topk_idx, tokens, top_k, INT32_MAX);
  const int L = expert_end - expert_begin;
  MaskedLayout out;
  out.expert_begin = expert_begin;
  out.expert_end = expert_end;
  out.capacity = capacity;
  out.tokens = tokens;
  out.top_k = top_k;
  out.masked_m.assign(L, 0);
  out.row_src.assign(static_cast<size_t>(L) * capacity, -1);
  out.src_to_row.assign(static_cast<size_t>(tokens) * top_k, -1);
  for (int64_t i = 0; i < tokens * top_k; ++i) {
    const int32_t e = topk_idx[i];
    if (e < expert_begin || e >= expert_end) continue;
    const int local = e - expert_begin;
    const int j = out.masked_m[local]++;
    FM_CHECK_ARG(j < capacity, "expert ", e, " receives more than capacity=", capacity, " slots");
    const int64_t row = static_cast<int64_t>(local) * capacity + j;
    out.row_src[row] = static_cast<int32_t>(i);
    out.src_to_row[i] = static_cast<int32_t>(row);
  }
  return out;
}

std::vector<float> permute_rows(const std::vector<int32_t>& row_src, int top_k, const float* x,
                                int64_t hidden) {
  FM_CHECK_ARG(top_k > 0, "top_k=", top_k, " must be > 0");
  std::vector<float> out(row_src.size() * hidden, 0.0f);
  for (size_t row = 0; row < row_src.size(); ++row) {
    if (row_src[row] < 0) continue;
    const int64_t t = row_src[row] / top_k;
    std::copy(x + t * hidden, x + (t + 1) * hidden, out.begin() + row * hidden);
  }
  return out;
}

std::vector<float> combine_rows(const std::vector<int32_t>& src_to_row, int64_t tokens, int top_k,
                                const float* weight, const float* y, int64_t hidden) {
  FM_CHECK_ARG(src_to_row.size() == static_cast<size_t>(tokens * top_k), "src_to_row holds ",
               src_to_row.size(), " entries, expected T*K=", tokens * top_k);
  std::vector<float> out(static_cast<size_t>(tokens) * hidden, 0.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    float* o = out.data() + t * hidden;
    for (int k = 0; k < top_k; ++k) {
      const int32_t row = src_to_row[t * top_k + k];
      if (row < 0) continue;
      const float w = weight[t * top_k + k];
      const float* yr = y + static_cast<int64_t>(row) * hidden;
      for (int64_t h = 0; h < hidden; ++h) o[h] += w * yr[h];
    }
  }
  return out;
}

}  // namespace fp8moe
