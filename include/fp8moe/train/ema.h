// An exponential moving average of the weights kept off the training path: the training loop
// hands over a snapshot (a copy of the FP32 weights, taken between steps) and goes on at once; a
// separate thread folds the snapshot in (ema = decay * ema + (1 - decay) * w). Snapshots queue
// up, so the average is the same whatever the thread's timing; the trainer waits for the queue
// only when it saves a checkpoint.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "fp8moe/model/model.h"

namespace fp8moe {

class WeightEma {
 public:
  WeightEma(const std::deque<Parameter>& params, double decay);
  ~WeightEma();
  WeightEma(const WeightEma&) = delete;
  WeightEma& operator=(const WeightEma&) = delete;

  // Copies the weights and returns without waiting for the average to be updated.
  void submit(const std::deque<Parameter>& params);
  // Waits until every submitted snapshot is folded in (for checkpoints and tests).
  void flush();
  // The average (call flush() first); set_values restores it from a checkpoint.
  const std::vector<std::vector<float>>& values() const { return ema_; }
  void set_values(std::vector<std::vector<float>> values);
  double decay() const { return decay_; }
  int64_t updates() const { return updates_; }

 private:
  void run();

  double decay_;
  std::vector<std::vector<float>> ema_;
  std::deque<std::vector<std::vector<float>>> queue_;
  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  bool busy_ = false, stop_ = false;
  int64_t updates_ = 0;
  std::thread thread_;
};

}  // namespace fp8moe
