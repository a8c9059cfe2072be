#include "fp8moe/core/chunk_pool.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace fp8moe {

namespace {

// One job at a time (the `busy` flag); workers sleep on a condition variable between jobs.
class ChunkPool {
 public:
  // Never destroyed: detached workers may still be waiting when static destructors run.
  static ChunkPool& get() {
    static ChunkPool* pool = new ChunkPool;
    return *pool;
  }

  bool try_run(int64_t tasks, const std::function<void(int64_t)>& task) {
    // NOTE: an atomic flag, not a mutex: a task on the calling thread may call back in, and
    // try_lock on a mutex the thread already owns is undefined.
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire)) return false;
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // NOTE: a new worker starts from the current generation, so it takes part in this job even
      // when it first locks the mutex after the job was published.
      while (workers_ < tasks - 1) {
        std::thread([this, seen = generation_] { worker(seen); }).detach();
        ++workers_;
      }
      task_ = &task;
      tasks_ = tasks;
      next_ = 0;
      pending_ = tasks;
      error_ = nullptr;
      ++generation_;
      work_cv_.notify_all();
      run_tasks(lock);
      done_cv_.wait(lock, [&] { return pending_ == 0; });
      task_ = nullptr;
      error = error_;
    }
    busy_.store(false, std::memory_order_release);
    if (error) std::rethrow_exception(error);
    return true;
  }

 private:
  // Claims and runs tasks until none is left; `lock` holds mutex_ on entry and on exit.
  void run_tasks(std::unique_lock<std::mutex>& lock) {
    while (next_ < tasks_) {
      const int64_t i = next_++;
      const std::function<void(int64_t)>* task = task_;
      lock.unlock();
      std::exception_ptr error;
      try {
        (*task)(i);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (error && !error_) error_ = error;
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }

  void worker(uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_cv_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      run_tasks(lock);
    }
  }

  std::atomic<bool> busy_{false};
  std::mutex mutex_;  // guards everything below
  std::condition_variable work_cv_, done_cv_;
  int64_t workers_ = 0;
  uint64_t generation_ = 0;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t tasks_ = 0, next_ = 0, pending_ = 0;
  std::exception_ptr error_;
};

}  // namespace

bool run_on_chunk_pool(int64_t tasks, const std::function<void(int64_t)>& task) {
  if (tasks <= 0) return true;
  return ChunkPool::get().try_run(tasks, task);
}

}  // namespace fp8moe
