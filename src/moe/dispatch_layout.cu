// Dispatch layout on the GPU: per-expert / per-rank counts, the grouped-contiguous layout
// (128-aligned expert blocks, -1 padding) and the masked layout, with inverse maps. Rows of an
// expert are in ascending slot order, as on the CPU: slots are ranked per chunk with warp
// match/ballot (order-preserving), then chunk bases come from a scan over chunks.
// Checked against src/moe/dispatch_layout.cpp (bit for bit).
// Test: build-device/tests/test_moe_gpu --gtest_filter='LayoutGpu*'
#include <algorithm>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/moe/dispatch_layout_cuda.h"

namespace fp8moe {

namespace {

constexpr int kChunk = 1024;  // slots ranked by one warp, in order
constexpr int kThreads = 256;

int64_t num_chunks(int64_t slots) {
  return (slots + kChunk - 1) / kChunk;
}

// --- counts ---------------------------------------------------------------------------------
__global__ void zero_kernel(int32_t* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    p[i] = 0;
}

__global__ void counts_kernel(const int32_t* __restrict__ topk_idx, int64_t tokens, int top_k,
                              int experts_per_rank, int num_ranks, int32_t* __restrict__ per_expert,
                              int32_t* __restrict__ per_rank, uint8_t* __restrict__ in_rank) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= tokens) return;
  const int32_t* ids = topk_idx + t * top_k;
  uint8_t* row = in_rank + t * num_ranks;
  for (int r = 0; r < num_ranks; ++r) row[r] = 0;
  for (int k = 0; k < top_k; ++k) {
    const int32_t e = ids[k];
    if (e < 0) continue;
    atomicAdd(per_expert + e, 1);
    const int r = e / experts_per_rank;
    if (!row[r]) {
      row[r] = 1;
      atomicAdd(per_rank + r, 1);
    }
  }
}

// --- stable ranking ---------------------------------------------------------------------------
// One warp per chunk: local_rank[i] = number of earlier slots of the chunk with the same local
// expert; chunk_counts[c, e] = slots of expert e in chunk c. Shared counters, one per expert.
__global__ void rank_chunks_kernel(const int32_t* __restrict__ topk_idx, int64_t slots,
                                   int expert_begin, int L, int32_t* __restrict__ local_rank,
                                   int32_t* __restrict__ chunk_counts) {
  extern __shared__ int32_t counter[];
  const int lane = threadIdx.x;
  const int64_t c = blockIdx.x;
  for (int e = lane; e < L; e += 32) counter[e] = 0;
  __syncwarp();
  const int64_t begin = c * kChunk, end = min(slots, begin + kChunk);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    int e = -1;
    if (i < end) {
      const int32_t g = topk_idx[i];
      if (g >= expert_begin && g < expert_begin + L) e = g - expert_begin;
    }
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const unsigned lower = same & ((1u << lane) - 1u);
    if (e >= 0) {
      const int before = counter[e];
      local_rank[i] = before + __popc(lower);
      __syncwarp(same);
      // The lowest lane of each set advances the counter once all of the set have read it.
      if (lower == 0) counter[e] = before + __popc(same);
    }
    __syncwarp();
  }
  for (int e = lane; e < L; e += 32) chunk_counts[c * L + e] = counter[e];
}

// One thread per expert: exclusive scan of its counts over chunks (in place) and the total.
__global__ void scan_chunks_kernel(int32_t* __restrict__ chunk_counts, int64_t chunks, int L,
                                   int32_t* __restrict__ totals) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= L) return;
  int32_t run = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int32_t v = chunk_counts[c * L + e];
    chunk_counts[c * L + e] = run;
    run += v;
  }
  totals[e] = run;
}

// One block: expert block offsets rounded up to align (L is small; a serial scan is enough).
__global__ void offsets_kernel(const int32_t* __restrict__ counts, int L, int align,
                               int32_t* __restrict__ offsets) {
  if (threadIdx.x != 0) return;
  int32_t run = 0;
  for (int e = 0; e < L; ++e) {
    offsets[e] = run;
    run += (counts[e] + align - 1) / align * align;
  }
  offsets[L] = run;
}

// m_indices for every row of the capacity (binary search for the block), -1 row_src on
// padding rows (valid rows are written by the scatter).
__global__ void fill_rows_kernel(const int32_t* __restrict__ offsets,
                                 const int32_t* __restrict__ counts, int L, int64_t capacity,
                                 int32_t* __restrict__ m_indices, int32_t* __restrict__ row_src) {
  for (int64_t row = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; row < capacity;
       row += int64_t{gridDim.x} * blockDim.x) {
    int lo = 0, hi = L;  // last e with offsets[e] <= row
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (offsets[mid] <= row)
        lo = mid;
      else
        hi = mid;
    }
    const bool valid = L > 0 && row < offsets[L] && row < offsets[lo] + counts[lo];
    m_indices[row] = valid ? lo : -1;
    if (!valid) row_src[row] = -1;
  }
}

__global__ void scatter_grouped_kernel(const int32_t* __restrict__ topk_idx, int64_t slots,
                                       int expert_begin, int L,
                                       const int32_t* __restrict__ local_rank,
                                       const int32_t* __restrict__ chunk_base,
                                       const int32_t* __restrict__ offsets,
                                       int32_t* __restrict__ row_src,
                                       int32_t* __restrict__ src_to_row) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= slots) return;
  const int32_t g = topk_idx[i];
  if (g < expert_begin || g >= expert_begin + L) {
    src_to_row[i] = -1;
    return;
  }
  const int e = g - expert_begin;
  const int32_t row = offsets[e] + chunk_base[(i / kChunk) * L + e] + local_rank[i];
  row_src[row] = static_cast<int32_t>(i);
  src_to_row[i] = row;
}

__global__ void fill_value_kernel(int32_t* p, int64_t n, int32_t value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    p[i] = value;
}

__global__ void scatter_masked_kernel(const int32_t* __restrict__ topk_idx, int64_t slots,
                                      int expert_begin, int L, int capacity,
                                      const int32_t* __restrict__ local_rank,
                                      const int32_t* __restrict__ chunk_base,
                                      int32_t* __restrict__ row_src,
                                      int32_t* __restrict__ src_to_row) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= slots) return;
  const int32_t g = topk_idx[i];
  src_to_row[i] = -1;
  if (g < expert_begin || g >= expert_begin + L) return;
  const int e = g - expert_begin;
  const int32_t j = chunk_base[(i / kChunk) * L + e] + local_rank[i];
  if (j >= capacity) return;
  const int64_t row = static_cast<int64_t>(e) * capacity + j;
  row_src[row] = static_cast<int32_t>(i);
  src_to_row[i] = static_cast<int32_t>(row);
}

unsigned grid_for(int64_t n, int threads = kThreads) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, int64_t{1} << 20)));
}

struct Workspace {
  int32_t* local_rank;
  int32_t* chunk_counts;
};

Workspace carve(void* workspace, size_t bytes, int64_t tokens, int top_k, int L) {
  FM_CHECK_ARG(bytes >= layout_cuda_workspace_bytes(tokens, top_k, L), "layout workspace of ",
               bytes, " bytes is smaller than the ", layout_cuda_workspace_bytes(tokens, top_k, L),
               " needed");
  auto* p = static_cast<int32_t*>(workspace);
  return {p, p + tokens * top_k};
}

void check_layout_args(int64_t tokens, int top_k, int expert_begin, int expert_end) {
  FM_CHECK_ARG(tokens >= 0 && top_k > 0, "tokens=", tokens, " top_k=", top_k);
  FM_CHECK_ARG(tokens * top_k <= INT32_MAX, "T*K=", tokens * top_k, " exceeds int32 rows");
  FM_CHECK_ARG(expert_begin >= 0 && expert_end >= expert_begin, "expert range [", expert_begin,
               ", ", expert_end, ") is invalid");
  FM_CHECK_ARG(expert_end - expert_begin <= kLayoutCudaMaxLocalExperts, "local experts ",
               expert_end - expert_begin, " exceed ", kLayoutCudaMaxLocalExperts);
}

// Ranks every local slot; afterwards ws.chunk_counts holds chunk bases, totals the counts.
void rank_slots(const int32_t* topk_idx, int64_t slots, int expert_begin, int L, Workspace ws,
                int32_t* totals, cudaStream_t stream) {
  const int64_t chunks = num_chunks(slots);
  if (L == 0) return;
  if (chunks > 0) {
    rank_chunks_kernel<<<static_cast<unsigned>(chunks), 32, sizeof(int32_t) * L, stream>>>(
        topk_idx, slots, expert_begin, L, ws.local_rank, ws.chunk_counts);
    FM_CHECK_LAUNCH();
  }
  scan_chunks_kernel<<<grid_for(L), kThreads, 0, stream>>>(ws.chunk_counts, chunks, L, totals);
  FM_CHECK_LAUNCH();
}

}  // namespace

size_t layout_cuda_workspace_bytes(int64_t tokens, int top_k, int num_local_experts) {
  const int64_t slots = tokens * top_k;
  return sizeof(int32_t) * static_cast<size_t>(slots + num_chunks(slots) * num_local_experts);
}

void dispatch_counts_cuda(const int32_t* topk_idx, int64_t tokens, int top_k,
                          const ExpertSharding& sharding, DispatchCountsDevice out,
                          cudaStream_t stream) {
  validate_sharding(sharding);
  FM_CHECK_ARG(tokens >= 0 && top_k > 0, "tokens=", tokens, " top_k=", top_k);
  zero_kernel<<<grid_for(sharding.num_experts), kThreads, 0, stream>>>(out.tokens_per_expert,
                                                                       sharding.num_experts);
  FM_CHECK_LAUNCH();
  zero_kernel<<<grid_for(sharding.num_ranks), kThreads, 0, stream>>>(out.tokens_per_rank,
                                                                     sharding.num_ranks);
  FM_CHECK_LAUNCH();
  if (tokens == 0) return;
  counts_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(
      topk_idx, tokens, top_k, sharding.experts_per_rank(), sharding.num_ranks,
      out.tokens_per_expert, out.tokens_per_rank, out.token_in_rank);
  FM_CHECK_LAUNCH();
}

void grouped_layout_cuda(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                         int expert_end, int align, GroupedLayoutDevice out, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  check_layout_args(tokens, top_k, expert_begin, expert_end);
  FM_CHECK_ARG(align > 0, "align=", align, " must be > 0");
  const int L = expert_end - expert_begin;
  FM_CHECK_ARG(out.row_capacity >= grouped_layout_max_rows(tokens, top_k, L, align),
               "row_capacity=", out.row_capacity, " is below grouped_layout_max_rows=",
               grouped_layout_max_rows(tokens, top_k, L, align));
  const Workspace ws = carve(workspace, workspace_bytes, tokens, top_k, L);
  const int64_t slots = tokens * top_k;
  rank_slots(topk_idx, slots, expert_begin, L, ws, out.expert_counts, stream);
  offsets_kernel<<<1, 32, 0, stream>>>(out.expert_counts, L, align, out.expert_offsets);
  FM_CHECK_LAUNCH();
  if (out.row_capacity > 0) {
    fill_rows_kernel<<<grid_for(out.row_capacity), kThreads, 0, stream>>>(
        out.expert_offsets, out.expert_counts, L, out.row_capacity, out.m_indices, out.row_src);
    FM_CHECK_LAUNCH();
  }
  if (slots == 0) return;
  scatter_grouped_kernel<<<grid_for(slots), kThreads, 0, stream>>>(
      topk_idx, slots, expert_begin, L, ws.local_rank, ws.chunk_counts, out.expert_offsets,
      out.row_src, out.src_to_row);
  FM_CHECK_LAUNCH();
}

void masked_layout_cuda(const int32_t* topk_idx, int64_t tokens, int top_k, int expert_begin,
                        int expert_end, int capacity, MaskedLayoutDevice out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  check_layout_args(tokens, top_k, expert_begin, expert_end);
  FM_CHECK_ARG(capacity >= 0, "capacity=", capacity, " must be >= 0");
  const int L = expert_end - expert_begin;
  const Workspace ws = carve(workspace, workspace_bytes, tokens, top_k, L);
  const int64_t slots = tokens * top_k;
  rank_slots(topk_idx, slots, expert_begin, L, ws, out.masked_m, stream);
  const int64_t rows = static_cast<int64_t>(L) * capacity;
  if (rows > 0) {
    fill_value_kernel<<<grid_for(rows), kThreads, 0, stream>>>(out.row_src, rows, -1);
    FM_CHECK_LAUNCH();
  }
  if (slots == 0) return;
  scatter_masked_kernel<<<grid_for(slots), kThreads, 0, stream>>>(
      topk_idx, slots, expert_begin, L, capacity, ws.local_rank, ws.chunk_counts, out.row_src,
      out.src_to_row);
  FM_CHECK_LAUNCH();
}

}  // namespace fp8moe
