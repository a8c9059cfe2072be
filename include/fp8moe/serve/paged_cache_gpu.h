// The latent KV cache of every layer of a model on one GPU (the main layers, then the MTP
// modules' decoder layers: the draft model's cache, serve/generator_gpu.h), paged (V3's inference
// form: per token the normalised latent and the rotated decoupled key, kv_lora_rank +
// qk_rope_head_dim BF16 a layer; kernels/mla_decode.h's layout), with its host bookkeeping
// (PageAllocator): the same page ids in every layer, so one page table serves all layers of a step.
// prepare_step() writes the step's page table and lengths to the device (through pinned memory,
// after the stream's earlier work: it synchronises `stream` first) and returns the layers' views
// (ModelGpu::decode takes the first num_hidden_layers, decode_mtp the next).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fp8moe/model/config.h"
#include "fp8moe/model/mla_block_gpu.h"
#include "fp8moe/serve/page_allocator.h"

namespace fp8moe::serve {

struct PagedCacheOptions {
  int64_t num_pages = 0;          // the pool (every layer holds this many pages)
  int64_t page_tokens = 64;       // a multiple of 64 (the decode kernel's key tile)
  int64_t max_pages_per_seq = 0;  // the longest context / page_tokens, rounded up
  int64_t max_batch = 0;          // sequences a step
};

class PagedLatentCacheGpu {
 public:
  PagedLatentCacheGpu(const ModelConfig& config, const PagedCacheOptions& options);
  ~PagedLatentCacheGpu();
  PagedLatentCacheGpu(const PagedLatentCacheGpu&) = delete;
  PagedLatentCacheGpu& operator=(const PagedLatentCacheGpu&) = delete;

  PageAllocator& pages() { return alloc_; }
  const PageAllocator& pages() const { return alloc_; }
  std::vector<MlaLatentCacheView> prepare_step(const std::vector<int>& seqs, cudaStream_t stream);
  int64_t bytes() const { return bytes_; }  // the device pages of all layers
  // Sequence `seq`'s first `length` rows of every layer to (to_cache false) or from (true) `rows`
  // [layers, length, row] BF16 (device memory; a peer GPU's where peer access is on): how a
  // prefilled request moves between GPUs (serve/disaggregated_gpu.h). Synchronises `stream`
  // first (the pinned page list), then enqueues the copy.
  void copy_rows(int seq, int64_t length, bf16* rows, bool to_cache, cudaStream_t stream);

 private:
  PageAllocator alloc_;
  int64_t layers_ = 0, row_ = 0, max_batch_ = 0, bytes_ = 0;
  bf16* pages_ = nullptr;
  int32_t *d_table_ = nullptr, *d_lens_ = nullptr, *h_table_ = nullptr, *h_lens_ = nullptr;
  int32_t *d_seq_pages_ = nullptr, *h_seq_pages_ = nullptr;  // copy_rows' page list
};

}  // namespace fp8moe::serve
