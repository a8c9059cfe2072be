#include "fp8moe/train/optimizer.h"

#include <cmath>
#include <numbers>

#include "fp8moe/core/error.h"
#include "fp8moe/fp8/codec.h"
#include "fp8moe/moe/balance.h"

namespace fp8moe {

double learning_rate(const AdamWConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step < c.warmup_steps)
    return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const int64_t decay = std::max<int64_t>(1, c.total_steps - c.warmup_steps);
  const double progress =
      std::min(1.0, static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

double clip_gradients(std::deque<Parameter>& params, double max_norm) {
  double ss = 0;
  for (const auto& p : params)
    for (float g : p.grad) ss += static_cast<double>(g) * g;
  const double norm = std::sqrt(ss);
  if (max_norm > 0 && norm > max_norm) {
    const float s = static_cast<float>(max_norm / norm);
    for (auto& p : params)
      for (float& g : p.grad) g *= s;
  }
  return norm;
}

AdamW::AdamW(const AdamWConfig& config, const std::deque<Parameter>& params) : config_(config) {
  for (const auto& p : params) {
    m_.emplace_back(p.value.size(), uint16_t{0});
    v_.emplace_back(p.value.size(), uint16_t{0});
  }
}

void AdamW::step(std::deque<Parameter>& params, int64_t step) {
  FM_CHECK(params.size() == m_.size(), "optimizer state does not match the parameters");
  const double lr = learning_rate(config_, step);
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double c1 = 1.0 - std::pow(b1, static_cast<double>(step + 1));
  const double c2 = 1.0 - std::pow(b2, static_cast<double>(step + 1));
  for (size_t i = 0; i < params.size(); ++i) {
    Parameter& p = params[i];
    uint16_t* m = m_[i].data();
    uint16_t* v = v_[i].data();
    const double wd = p.weight_decay ? config_.weight_decay : 0.0;
    for (size_t j = 0; j < p.value.size(); ++j) {
      const float g = p.grad[j];
      // NOTE: moments live in BF16: each update is computed in FP32 and rounded once.
      const float mj =
          static_cast<float>(b1) * bf16_bits_to_float(m[j]) + static_cast<float>(1 - b1) * g;
      const float vj =
          static_cast<float>(b2) * bf16_bits_to_float(v[j]) + static_cast<float>(1 - b2) * g * g;
      m[j] = float_to_bf16_bits(mj);
      v[j] = float_to_bf16_bits(vj);
      const double mh = bf16_bits_to_float(m[j]) / c1;
      const double vh = bf16_bits_to_float(v[j]) / c2;
      const double w = p.value[j];
      p.value[j] = static_cast<float>(w - lr * (mh / (std::sqrt(vh) + config_.eps) + wd * w));
    }
  }
}

void update_router_bias(std::deque<Parameter>& buffers,
                        const std::vector<std::vector<int64_t>>& loads, double speed) {
  FM_CHECK(buffers.size() == loads.size(), "router biases (", buffers.size(),
           ") do not match the MoE blocks (", loads.size(), ")");
  for (size_t b = 0; b < buffers.size(); ++b) {
    FM_CHECK(loads[b].size() == buffers[b].value.size(), "expert count mismatch");
    update_bias(buffers[b].value, loads[b], static_cast<float>(speed));
  }
}

}  // namespace fp8moe
