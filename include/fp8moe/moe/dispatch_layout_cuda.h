// Dispatch layout on the GPU: the same arrays as dispatch_layout.h's CPU functions, bit for
// bit (rows of an expert in ascending slot order), on device memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "fp8moe/moe/dispatch_layout.h"

namespace fp8moe {

// Limit of the layout kernels (checked on the host, kInvalidArgument): local experts per call.
inline constexpr int kLayoutCudaMaxLocalExperts = 8192;

// All pointers device memory, sized by the caller; outputs fully overwritten.
struct DispatchCountsDevice {
  int32_t* tokens_per_expert = nullptr;  // [E]
  int32_t* tokens_per_rank = nullptr;    // [R]
  uint8_t* token_in_rank = nullptr;      // [T, R]
};
void dispatch_counts_cuda(const int32_t* topk_idx, int64_t tokens, int top_k,
                          const ExpertSharding& sharding, DispatchCountsDevice out,
                          cudaStream_t stream);

struct GroupedLayoutDevice {
  int32_t* expert_counts = nullptr;   // [L]
  int32_t* expert_offsets = nullptr;  // [L + 1]; expert_offsets[L] = rows in use
  int32_t* m_indices = nullptr;       // [row_capacity]; rows past the last block are -1 too
  int32_t* row_src = nullptr;         // [row_capacity]
  int32_t* src_to_row = nullptr;      // [T * K]
  int64_t row_capacity = 0;           // >= grouped_layout_max_rows(T, K, L, align)
};
// Scratch memory the layout kernels need (chunked stable ranking).
size_t layout_cuda_workspace_bytes(int64_t tokens, int top_k, int num_local_experts);
void grouped_layout_cuda(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                         int expert_end, int align, GroupedLayoutDevice out, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

struct MaskedLayoutDevice {
  int32_t* masked_m = nullptr;    // [L] slots routed to each expert (may exceed capacity)
  int32_t* row_src = nullptr;     // [L * capacity]
  int32_t* src_to_row = nullptr;  // [T * K]
};
// Unlike the CPU version (which throws), slots past an expert's capacity are dropped
// (src_to_row = -1) and masked_m keeps the full count, so the caller can detect it.
void masked_layout_cuda(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                        int expert_end, int capacity, MaskedLayoutDevice out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

}  // namespace fp8moe
