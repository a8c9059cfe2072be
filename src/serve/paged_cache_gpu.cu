// PagedLatentCacheGpu (serve/paged_cache_gpu.h).
#include "fp8moe/serve/paged_cache_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fp8moe/core/cuda_check.h"
#include "fp8moe/core/error.h"

namespace fp8moe::serve {
namespace {

// Row t of layer l: pages[l] + (page_ids[t / page_tokens] * page_tokens + t % page_tokens) * row
// <-> rows[(l * length + t) * row]; 16-byte words (row * 2 is a multiple of 16).
__global__ void copy_rows_kernel(uint4* pages, int64_t layer_words, const int32_t* page_ids,
                                 int64_t page_tokens, int64_t row_words, uint4* rows,
                                 int64_t length, bool to_cache) {
  const int64_t t = blockIdx.x, l = blockIdx.y;
  const int64_t slot =
      static_cast<int64_t>(page_ids[t / page_tokens]) * page_tokens + t % page_tokens;
  uint4* cache_row = pages + l * layer_words + slot * row_words;
  uint4* flat_row = rows + (l * length + t) * row_words;
  for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) {
    if (to_cache)
      cache_row[w] = flat_row[w];
    else
      flat_row[w] = cache_row[w];
  }
}

}  // namespace

PagedLatentCacheGpu::PagedLatentCacheGpu(const ModelConfig& config, const PagedCacheOptions& o)
    : alloc_(o.num_pages, o.page_tokens, o.max_pages_per_seq) {
  FM_CHECK_ARG(o.page_tokens % 64 == 0, "PagedLatentCacheGpu: page_tokens=", o.page_tokens,
               " must be a multiple of 64");
  FM_CHECK_ARG(o.max_batch > 0, "PagedLatentCacheGpu: max_batch=", o.max_batch,
               " must be positive");
  layers_ = config.num_hidden_layers + config.num_nextn_predict_layers;  // then the MTP modules'
  row_ = config.kv_lora_rank + config.qk_rope_head_dim;
  max_batch_ = o.max_batch;
  bytes_ = layers_ * o.num_pages * o.page_tokens * row_ * static_cast<int64_t>(sizeof(bf16));
  FM_CHECK_CUDA(cudaMalloc(&pages_, static_cast<size_t>(bytes_)));
  const size_t table = static_cast<size_t>(o.max_batch * o.max_pages_per_seq) * sizeof(int32_t);
  const size_t lens = static_cast<size_t>(o.max_batch) * sizeof(int32_t);
  FM_CHECK_CUDA(cudaMalloc(&d_table_, table));
  FM_CHECK_CUDA(cudaMalloc(&d_lens_, lens));
  FM_CHECK_CUDA(cudaMallocHost(&h_table_, table));
  FM_CHECK_CUDA(cudaMallocHost(&h_lens_, lens));
  const size_t seq_pages = static_cast<size_t>(o.max_pages_per_seq) * sizeof(int32_t);
  FM_CHECK_CUDA(cudaMalloc(&d_seq_pages_, seq_pages));
  FM_CHECK_CUDA(cudaMallocHost(&h_seq_pages_, seq_pages));
}

PagedLatentCacheGpu::~PagedLatentCacheGpu() {
  cudaFree(pages_);
  cudaFree(d_table_);
  cudaFree(d_lens_);
  cudaFreeHost(h_table_);
  cudaFreeHost(h_lens_);
  cudaFree(d_seq_pages_);
  cudaFreeHost(h_seq_pages_);
}

void PagedLatentCacheGpu::copy_rows(int seq, int64_t length, bf16* rows, bool to_cache,
                                    cudaStream_t stream) {
  FM_CHECK_ARG(length >= 1 && length <= alloc_.length(seq),
               "PagedLatentCacheGpu::copy_rows: ", length, " rows of a sequence of ",
               alloc_.length(seq));
  FM_CHECK_ARG(rows != nullptr && reinterpret_cast<uintptr_t>(rows) % 16 == 0 && row_ % 8 == 0,
               "PagedLatentCacheGpu::copy_rows: rows must be 16-byte aligned (row ", row_, ")");
  const std::vector<int32_t>& ids = alloc_.pages(seq);
  const int64_t n = (length + alloc_.page_tokens() - 1) / alloc_.page_tokens();
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));  // the pinned list may feed the previous copy
  std::copy(ids.begin(), ids.begin() + n, h_seq_pages_);
  FM_CHECK_CUDA(cudaMemcpyAsync(d_seq_pages_, h_seq_pages_, static_cast<size_t>(n) * 4,
                                cudaMemcpyHostToDevice, stream));
  const int64_t words = row_ / 8;
  copy_rows_kernel<<<dim3(static_cast<unsigned>(length), static_cast<unsigned>(layers_)), 64, 0,
                     stream>>>(
      reinterpret_cast<uint4*>(pages_), alloc_.num_pages() * alloc_.page_tokens() * words,
      d_seq_pages_, alloc_.page_tokens(), words, reinterpret_cast<uint4*>(rows), length, to_cache);
  FM_CHECK_CUDA(cudaGetLastError());
}

std::vector<MlaLatentCacheView> PagedLatentCacheGpu::prepare_step(const std::vector<int>& seqs,
                                                                  cudaStream_t stream) {
  const int64_t b = static_cast<int64_t>(seqs.size());
  FM_CHECK_ARG(b > 0 && b <= max_batch_, "PagedLatentCacheGpu::prepare_step: ", b,
               " sequences outside [1, max_batch=", max_batch_, "]");
  // The pinned rows may still feed the previous step's copy.
  FM_CHECK_CUDA(cudaStreamSynchronize(stream));
  alloc_.table_rows(seqs, h_table_, h_lens_);
  const int64_t mp = alloc_.max_pages_per_seq();
  FM_CHECK_CUDA(cudaMemcpyAsync(d_table_, h_table_, static_cast<size_t>(b * mp) * sizeof(int32_t),
                                cudaMemcpyHostToDevice, stream));
  FM_CHECK_CUDA(cudaMemcpyAsync(d_lens_, h_lens_, static_cast<size_t>(b) * sizeof(int32_t),
                                cudaMemcpyHostToDevice, stream));
  std::vector<MlaLatentCacheView> views(static_cast<size_t>(layers_));
  const int64_t layer_elems = alloc_.num_pages() * alloc_.page_tokens() * row_;
  for (int64_t l = 0; l < layers_; ++l) {
    views[l].pages = pages_ + l * layer_elems;
    views[l].page_table = d_table_;
    views[l].seq_lens = d_lens_;
    views[l].page_tokens = alloc_.page_tokens();
    views[l].max_pages = mp;
  }
  return views;
}

}  // namespace fp8moe::serve
