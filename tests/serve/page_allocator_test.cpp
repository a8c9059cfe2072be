// PageAllocator (serve/page_allocator.h): pages are handed out and returned exactly once, grow is
// all-or-nothing at the pool's and the sequence's limits, and the step's table rows list each
// sequence's pages in token order with -1 after them.
// Run: test_serve --gtest_filter='PageAllocator*'
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "fp8moe/core/error.h"
#include "fp8moe/serve/page_allocator.h"

namespace fp8moe::serve {
namespace {

TEST(PageAllocator, GrowsByWholePagesAndReturnsThemOnRelease) {
  PageAllocator a(6, 64, 4);
  const int s0 = a.add_sequence(), s1 = a.add_sequence();
  EXPECT_TRUE(a.grow(s0, 1));
  EXPECT_EQ(a.pages(s0).size(), 1u);
  EXPECT_TRUE(a.grow(s0, 64));  // still one page
  EXPECT_EQ(a.pages(s0).size(), 1u);
  EXPECT_TRUE(a.grow(s0, 65));
  EXPECT_EQ(a.pages(s0).size(), 2u);
  EXPECT_TRUE(a.grow(s1, 200));  // 4 pages
  EXPECT_EQ(a.free_pages(), 0);
  std::set<int32_t> all(a.pages(s0).begin(), a.pages(s0).end());
  all.insert(a.pages(s1).begin(), a.pages(s1).end());
  EXPECT_EQ(all.size(), 6u);      // no page given twice
  EXPECT_FALSE(a.grow(s0, 129));  // the pool is empty: nothing changes
  EXPECT_EQ(a.length(s0), 65);
  EXPECT_EQ(a.pages(s0).size(), 2u);
  a.release(s1);
  EXPECT_EQ(a.free_pages(), 4);
  EXPECT_FALSE(a.live(s1));
  EXPECT_THROW(a.length(s1), Error);
  EXPECT_TRUE(a.grow(s0, 256));
  EXPECT_FALSE(a.grow(s0, 257));        // a fifth page: above max_pages_per_seq
  EXPECT_THROW(a.grow(s0, 10), Error);  // cannot shrink
}

TEST(PageAllocator, ShrinkKeepsThePages) {
  PageAllocator a(4, 16, 4);
  const int s = a.add_sequence();
  ASSERT_TRUE(a.grow(s, 33));
  const std::vector<int32_t> pages = a.pages(s);
  a.shrink(s, 17);
  EXPECT_EQ(a.length(s), 17);
  EXPECT_EQ(a.pages(s), pages);
  EXPECT_EQ(a.free_pages(), 1);
  EXPECT_TRUE(a.grow(s, 48));  // within its pages: none taken
  EXPECT_EQ(a.free_pages(), 1);
  EXPECT_THROW(a.shrink(s, 49), Error);
}

TEST(PageAllocator, TableRowsInStepOrder) {
  PageAllocator a(8, 16, 3);
  const int s0 = a.add_sequence(), s1 = a.add_sequence();
  ASSERT_TRUE(a.grow(s0, 20));
  ASSERT_TRUE(a.grow(s1, 5));
  std::vector<int32_t> table(6), lens(2);
  a.table_rows({s1, s0}, table.data(), lens.data());
  EXPECT_EQ(lens, (std::vector<int32_t>{5, 20}));
  EXPECT_EQ(table[0], a.pages(s1)[0]);
  EXPECT_EQ(table[1], -1);
  EXPECT_EQ(table[3], a.pages(s0)[0]);
  EXPECT_EQ(table[4], a.pages(s0)[1]);
  EXPECT_EQ(table[5], -1);
}

TEST(PageAllocator, RejectsBadSizes) {
  EXPECT_THROW(PageAllocator(0, 64, 1), Error);
  EXPECT_THROW(PageAllocator(4, 0, 1), Error);
  EXPECT_THROW(PageAllocator(4, 64, 0), Error);
}

}  // namespace
}  // namespace fp8moe::serve
