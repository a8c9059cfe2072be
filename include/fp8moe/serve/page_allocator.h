// The page bookkeeping of a paged KV cache (host side; serve/paged_cache_gpu.h holds the device
// pages): a fixed pool of pages of `page_tokens` tokens, sequences that grow a page at a time and
// give all their pages back when they end, and the page-table rows a decoding step hands to the
// kernels (kernels/mla_decode.h: row b = sequence b's pages in token order, -1 after its last).
// A sequence never holds more than max_pages_per_seq pages (its longest context). grow() is
// all-or-nothing: when the pool cannot cover the new length, nothing changes and it returns false
// (the caller finishes or pauses that sequence). Tested by tests/serve/page_allocator_test.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace fp8moe::serve {

class PageAllocator {
 public:
  PageAllocator(int64_t num_pages, int64_t page_tokens, int64_t max_pages_per_seq);

  int add_sequence();                  // a new, empty sequence's id
  void release(int seq);               // its pages back to the pool; the id is not reused
  bool grow(int seq, int64_t length);  // length tokens (>= its current length)
  // Back to `length` tokens (<= its current length; e.g. a rejected draft's row): the pages stay
  // the sequence's, the rows past `length` are written again when it grows.
  void shrink(int seq, int64_t length);
  int64_t length(int seq) const;
  const std::vector<int32_t>& pages(int seq) const;
  bool live(int seq) const;

  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_pages() const { return num_pages_; }
  int64_t page_tokens() const { return page_tokens_; }
  int64_t max_pages_per_seq() const { return max_pages_; }

  // The step's page table [seqs.size(), max_pages_per_seq] and lengths, in `seqs` order.
  void table_rows(const std::vector<int>& seqs, int32_t* table, int32_t* lengths) const;

 private:
  struct Sequence {
    std::vector<int32_t> pages;
    int64_t length = 0;
    bool live = false;
  };
  const Sequence& at(int seq) const;
  int64_t num_pages_, page_tokens_, max_pages_;
  std::vector<int32_t> free_;  // a stack: the most recently freed page is reused first
  std::vector<Sequence> seqs_;
};

}  // namespace fp8moe::serve
