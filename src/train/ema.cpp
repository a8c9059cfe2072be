#include "fp8moe/train/ema.h"

#include "fp8moe/core/error.h"

namespace fp8moe {

WeightEma::WeightEma(const std::deque<Parameter>& params, double decay) : decay_(decay) {
  for (const auto& p : params) ema_.push_back(p.value);
  thread_ = std::thread([this] { run(); });
}

WeightEma::~WeightEma() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void WeightEma::submit(const std::deque<Parameter>& params) {
  std::vector<std::vector<float>> snap;
  snap.reserve(params.size());
  for (const auto& p : params) snap.push_back(p.value);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(snap));
  }
  wake_.notify_one();
}

void WeightEma::flush() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [this] { return queue_.empty() && !busy_; });
}

void WeightEma::set_values(std::vector<std::vector<float>> values) {
  flush();
  std::lock_guard<std::mutex> lock(mutex_);
  FM_CHECK(values.size() == ema_.size(), "EMA shape mismatch");
  ema_ = std::move(values);
}

void WeightEma::run() {
  for (;;) {
    std::vector<std::vector<float>> snap;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop requested and nothing left
      snap = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    const float d = static_cast<float>(decay_), one_minus = static_cast<float>(1.0 - decay_);
    for (size_t i = 0; i < ema_.size(); ++i)
      for (size_t j = 0; j < ema_[i].size(); ++j)
        ema_[i][j] = d * ema_[i][j] + one_minus * snap[i][j];
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++updates_;
      busy_ = false;
    }
    idle_.notify_all();
  }
}

}  // namespace fp8moe
