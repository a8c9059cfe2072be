// AdamW over FP32 master weights with BF16 moments (DeepSeek-V3's recipe), the warm-up +
// cosine learning-rate schedule, global gradient-norm clipping, and the auxiliary-loss-free
// balancing: each router's selection bias moves by `speed` toward under-loaded experts.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "fp8moe/model/model.h"

namespace fp8moe {

struct AdamWConfig {
  double lr = 3e-3;
  double min_lr_ratio = 0.1;  // the cosine ends at lr * min_lr_ratio
  int64_t warmup_steps = 30;
  int64_t total_steps = 300;
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double weight_decay = 0.1;
  double clip_norm = 1.0;  // 0 = no clipping
};

// Learning rate at step `step` (0-based): linear warm-up to lr, then cosine to lr*min_lr_ratio.
double learning_rate(const AdamWConfig& config, int64_t step);

// Scales every gradient so the global L2 norm is at most max_norm; returns the norm before.
double clip_gradients(std::deque<Parameter>& params, double max_norm);

class AdamW {
 public:
  AdamW(const AdamWConfig& config, const std::deque<Parameter>& params);
  // One update with the learning rate of `step` (0-based; bias correction uses step + 1).
  void step(std::deque<Parameter>& params, int64_t step);
  std::vector<std::vector<uint16_t>>& m() { return m_; }  // BF16 bits
  std::vector<std::vector<uint16_t>>& v() { return v_; }
  const AdamWConfig& config() const { return config_; }

 private:
  AdamWConfig config_;
  std::vector<std::vector<uint16_t>> m_, v_;
};

// bias_e += speed * sign(mean load - load_e) for each MoE block.
void update_router_bias(std::deque<Parameter>& buffers,
                        const std::vector<std::vector<int64_t>>& loads, double speed);

}  // namespace fp8moe
