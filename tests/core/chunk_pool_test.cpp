#include "fp8moe/core/chunk_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fp8moe {
namespace {

TEST(ChunkPool, RunsEveryTaskOnceOnSeveralThreads) {
  for (const int64_t tasks : {1, 2, 5, 2}) {  // the pool grows, then is reused
    std::vector<std::atomic<int>> runs(static_cast<size_t>(tasks));
    std::vector<std::thread::id> ids(static_cast<size_t>(tasks));
    std::atomic<int64_t> started{0};
    bool others_started = true;
    ASSERT_TRUE(run_on_chunk_pool(tasks, [&](int64_t i) {
      ++started;
      ++runs[static_cast<size_t>(i)];
      ids[static_cast<size_t>(i)] = std::this_thread::get_id();
      if (i == 0) {
        // The caller runs task 0 first; holding it makes the workers take all the others.
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
        while (started < tasks && std::chrono::steady_clock::now() < deadline)
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        others_started = started == tasks;
      }
    }));
    EXPECT_TRUE(others_started) << tasks << " tasks: the workers never took the other tasks";
    EXPECT_EQ(ids[0], std::this_thread::get_id());
    for (int64_t i = 0; i < tasks; ++i) {
      EXPECT_EQ(runs[static_cast<size_t>(i)], 1) << "task " << i;
      if (i > 0) {
        EXPECT_NE(ids[static_cast<size_t>(i)], std::this_thread::get_id()) << "task " << i;
      }
    }
  }
}

TEST(ChunkPool, RethrowsATaskExceptionAfterAllTasksFinished) {
  std::atomic<int> done{0};
  EXPECT_THROW(run_on_chunk_pool(4,
                                 [&](int64_t i) {
                                   if (i == 2) throw std::runtime_error("task 2");
                                   std::this_thread::sleep_for(std::chrono::milliseconds(2));
                                   ++done;
                                 }),
               std::runtime_error);
  EXPECT_EQ(done, 3);
  // The pool is usable again.
  std::atomic<int> after{0};
  EXPECT_TRUE(run_on_chunk_pool(3, [&](int64_t) { ++after; }));
  EXPECT_EQ(after, 3);
}

TEST(ChunkPool, ANestedCallIsRefusedSoTheCallerSplitsItsOwnWay) {
  std::atomic<int> refused{0};
  ASSERT_TRUE(run_on_chunk_pool(2, [&](int64_t) {
    if (!run_on_chunk_pool(2, [](int64_t) {})) ++refused;
  }));
  EXPECT_EQ(refused, 2);
}

TEST(ChunkPool, ConcurrentCallersEachGetTheirWorkDone) {
  std::atomic<int64_t> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep) {
        const auto task = [&](int64_t i) { sum += i + 1; };
        if (!run_on_chunk_pool(3, task))
          for (int64_t i = 0; i < 3; ++i) task(i);  // the caller's own split
      }
    });
  for (auto& t : callers) t.join();
  EXPECT_EQ(sum, 4 * 50 * 6);
}

}  // namespace
}  // namespace fp8moe
