// What the MoE-layer tests share, CPU and GPU alike (no CUDA here): a fresh seed printed for
// reproduction, random quantised expert weights, and the two-rank FP8 configs they run.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "fp8moe/comm/ep.h"
#include "fp8moe/core/philox.h"
#include "fp8moe/moe/expert_ffn_reference.h"

namespace fp8moe::comm::testing {

inline uint64_t fresh_seed() {
  const uint64_t seed = (uint64_t(std::random_device{}()) << 32) | std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

// G experts of hidden H and inter I, N(0, 1/fan_in) weights quantised 128x128.
inline ExpertWeightsHost random_expert_weights(int64_t G, int64_t H, int64_t I, PhiloxStream& rng) {
  std::vector<float> gate(G * I * H), up(G * I * H), down(G * H * I);
  for (float& v : gate) v = rng.normal() / std::sqrt(float(H));
  for (float& v : up) v = rng.normal() / std::sqrt(float(H));
  for (float& v : down) v = rng.normal() / std::sqrt(float(I));
  return quantize_expert_weights(gate.data(), up.data(), down.data(), G, H, I);
}

// Two ranks, FP8 payload.
inline EpConfig two_rank_fp8_config(int experts, int top_k, int64_t hidden, int64_t max_tokens,
                                    double timeout_s = 30.0) {
  EpConfig cfg;
  cfg.num_ranks = 2;
  cfg.num_experts = experts;
  cfg.top_k = top_k;
  cfg.hidden = hidden;
  cfg.max_tokens_per_rank = max_tokens;
  cfg.payload = Payload::kFP8;
  cfg.timeout_s = timeout_s;
  return cfg;
}

}  // namespace fp8moe::comm::testing
