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

 private:
  PageAllocator alloc_;
  int64_t layers_ = 0, row_ = 0, max_batch_ = 0, bytes_ = 0;
  bf16* pages_ = nullptr;
  int32_t *d_table_ = nullptr, *d_lens_ = nullptr, *h_table_ = nullptr, *h_lens_ = nullptr;
};

}  // namespace fp8moe::serve
