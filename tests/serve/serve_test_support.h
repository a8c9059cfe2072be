// What the serving GPU tests share (generator_gpu_test.cu, generator_group_gpu_test.cu,
// disaggregated_gpu_test.cu, redundant_experts_gpu_test.cu): the small V3-shaped model they serve,
// random prompts, the several-rank tests' generator options and their two-GPU check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../support/small_gpu_config.h"
#include "fp8moe/core/cuda_check.h"
#include "fp8moe/model/config.h"
#include "fp8moe/serve/generator_gpu.h"
#include "fp8moe/serve/sampling_options.h"

namespace fp8moe::serve::test_support {

// tests/support's small GPU config with kv_lora_rank 256 (the decode kernel's smallest latent),
// `mtp` MTP modules, `dense_layers` dense layers first, initialisation 0.05 (peakier logits than
// 0.02).
inline ModelConfig serve_config(int64_t mtp = 0, int64_t dense_layers = 1,
                                const std::string& what = "serve test config") {
  return test::small_gpu_config({{"kv_lora_rank", 256},
                                 {"num_nextn_predict_layers", mtp},
                                 {"first_k_dense_replace", dense_layers},
                                 {"initializer_range", 0.05}},
                                what);
}

inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = d(rng);
  return t;
}

// Three sequences at once, a context of 256, prefill chunks of 48 tokens (a 100- or 130-token
// prompt takes several passes: lockstep iterations, handoffs of several chunks).
inline GeneratorOptions three_at_once() {
  GeneratorOptions o;
  o.max_batch = 3;
  o.context = 256;
  o.prefill_chunk = 48;
  return o;
}

// Greedy decoding of a fixed length (EOS ignored, so every text is max_new_tokens long).
inline SamplingOptions greedy_sampling(int64_t max_new_tokens) {
  SamplingOptions s;
  s.max_new_tokens = max_new_tokens;
  s.ignore_eos = true;
  return s;
}

// The same length drawn at temperature 0.8 and top-p 0.9 from `seed`.
inline SamplingOptions nucleus_sampling(int64_t max_new_tokens, uint64_t seed) {
  SamplingOptions s = greedy_sampling(max_new_tokens);
  s.temperature = 0.8;
  s.top_p = 0.9;
  s.seed = seed;
  return s;
}

// The tests of one rank a GPU need two visible (skipped otherwise).
inline bool two_gpus() {
  int count = 0;
  FM_CHECK_CUDA(cudaGetDeviceCount(&count));
  return count >= 2;
}

}  // namespace fp8moe::serve::test_support
