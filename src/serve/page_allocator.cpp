// PageAllocator (serve/page_allocator.h).
#include "fp8moe/serve/page_allocator.h"

#include <algorithm>
#include <limits>

#include "fp8moe/core/error.h"

namespace fp8moe::serve {

PageAllocator::PageAllocator(int64_t num_pages, int64_t page_tokens, int64_t max_pages_per_seq)
    : num_pages_(num_pages), page_tokens_(page_tokens), max_pages_(max_pages_per_seq) {
  FM_CHECK_ARG(num_pages > 0 && num_pages <= std::numeric_limits<int32_t>::max(),
               "PageAllocator: num_pages=", num_pages, " outside [1, 2^31)");
  FM_CHECK_ARG(page_tokens > 0, "PageAllocator: page_tokens=", page_tokens, " must be positive");
  FM_CHECK_ARG(max_pages_per_seq > 0, "PageAllocator: max_pages_per_seq=", max_pages_per_seq,
               " must be positive");
  free_.resize(static_cast<size_t>(num_pages));
  // Page 0 on top: a fresh pool hands out pages 0, 1, 2, ...
  for (int64_t i = 0; i < num_pages; ++i) free_[i] = static_cast<int32_t>(num_pages - 1 - i);
}

const PageAllocator::Sequence& PageAllocator::at(int seq) const {
  FM_CHECK_ARG(seq >= 0 && seq < static_cast<int>(seqs_.size()) && seqs_[seq].live,
               "PageAllocator: sequence ", seq, " is not live");
  return seqs_[seq];
}

int PageAllocator::add_sequence() {
  seqs_.push_back(Sequence{{}, 0, true});
  return static_cast<int>(seqs_.size()) - 1;
}

void PageAllocator::release(int seq) {
  at(seq);
  Sequence& s = seqs_[seq];
  for (auto it = s.pages.rbegin(); it != s.pages.rend(); ++it) free_.push_back(*it);
  s.pages.clear();
  s.length = 0;
  s.live = false;
}

bool PageAllocator::grow(int seq, int64_t length) {
  const Sequence& cur = at(seq);
  FM_CHECK_ARG(length >= cur.length, "PageAllocator::grow: sequence ", seq, " has ", cur.length,
               " tokens; it cannot shrink to ", length);
  const int64_t need = (length + page_tokens_ - 1) / page_tokens_;
  if (need > max_pages_) return false;
  const int64_t more = need - static_cast<int64_t>(cur.pages.size());
  if (more > free_pages()) return false;
  Sequence& s = seqs_[seq];
  for (int64_t i = 0; i < more; ++i) {
    s.pages.push_back(free_.back());
    free_.pop_back();
  }
  s.length = length;
  return true;
}

void PageAllocator::shrink(int seq, int64_t length) {
  const Sequence& cur = at(seq);
  FM_CHECK_ARG(length >= 0 && length <= cur.length, "PageAllocator::shrink: sequence ", seq,
               " has ", cur.length, " tokens; it cannot shrink to ", length);
  seqs_[seq].length = length;
}

int64_t PageAllocator::length(int seq) const {
  return at(seq).length;
}

const std::vector<int32_t>& PageAllocator::pages(int seq) const {
  return at(seq).pages;
}

bool PageAllocator::live(int seq) const {
  return seq >= 0 && seq < static_cast<int>(seqs_.size()) && seqs_[seq].live;
}

void PageAllocator::table_rows(const std::vector<int>& seqs, int32_t* table,
                               int32_t* lengths) const {
  for (size_t b = 0; b < seqs.size(); ++b) {
    const Sequence& s = at(seqs[b]);
    int32_t* row = table + b * max_pages_;
    std::fill(row, row + max_pages_, -1);
    std::copy(s.pages.begin(), s.pages.end(), row);
    lengths[b] = static_cast<int32_t>(s.length);
  }
}

}  // namespace fp8moe::serve
